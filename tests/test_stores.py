"""Packs on Azure Blob Storage (az://, against Azurite on 127.0.0.1, started and stopped here) and Google Cloud
Storage (gs://: no emulator that serves the XML API obstore's GCS client speaks installs here, so only its
configuration and fault path are tested, against a port where nothing listens). The upload, the cache, the
fault policy and the loader are the ones s3:// uses (tests/test_remote.py)."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from crackio import ConfigError, make_loader
from crackio.storage.packs import open_pack
from crackio.storage.remote import Remote, RemoteError, Unreachable
from crackio.storage.upload import upload_pack
from tests.helpers import tiny, without_timing
from tests.test_remote import cache, epoch, started  # noqa: F401  (cache: a fixture)
from tools import servers

CONTAINER = "crackio-test"


@pytest.fixture(scope="module")
def az(tmp_path_factory):
    """Azurite's blob service; obstore reaches it through the variables a user sets for the emulator."""
    server = servers.azurite(tmp_path_factory.mktemp("azurite"))
    endpoint = started(server)
    try:
        from azure.storage.blob import BlobServiceClient

        account = f"AccountName={servers.AZURITE_ACCOUNT};AccountKey={servers.AZURITE_KEY}"
        BlobServiceClient.from_connection_string(f"{account};BlobEndpoint={endpoint};").create_container(CONTAINER)
        with pytest.MonkeyPatch.context() as env:  # the variables a user sets for the emulator, this module only
            env.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
            env.setenv("AZURITE_BLOB_STORAGE_URL", endpoint.rsplit("/", 1)[0])
            yield endpoint
    finally:
        server.__exit__(None, None, None)


def to_azure(shards) -> str:
    url = f"az://{CONTAINER}/{uuid.uuid4().hex[:12]}"
    upload_pack(shards, Remote(url))
    return url


@pytest.mark.parametrize("order", ["random", "block"])
def test_an_epoch_from_azure_is_the_local_epoch(az, cache, demo_shards, coded_shards, order):  # noqa: F811
    url = to_azure(demo_shards)
    assert open_pack(url).sha256 == open_pack(demo_shards).sha256  # the same pack, byte for byte
    remote, local = epoch(url, order), epoch(demo_shards, order)
    assert [b[0] for b in remote] == [b[0] for b in local]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(remote, local))
    # A mixture of a local pack and an Azure one reads each where it is.
    mixed = make_loader([str(coded_shards), url], "valid", batch_size=16, train=False, device="cpu", backend="torch")
    names = [n for b in mixed for n in b.names]
    assert len(names) == len(open_pack(coded_shards).index("valid")) + len(open_pack(demo_shards).index("valid"))


def test_tools_pack_uploads_to_azure_and_verify_reads_it_back(az, cache, demo_src, demo_shards, capsys):  # noqa: F811
    from tools.pack import main as pack_main

    url = f"az://{CONTAINER}/{uuid.uuid4().hex[:12]}"
    assert pack_main([str(demo_src), "--out", url, "--samples-per-shard", "50", "--workers", "1", "--quiet"]) == 0
    assert open_pack(url).sha256 == open_pack(demo_shards).sha256  # the same bytes as packed locally
    assert pack_main(["--verify", url]) == 0
    keys = Remote(url).keys()
    assert "manifest.json" in keys and ".crackio.lock" not in keys  # the writer's lock is gone


def test_azure_faults_are_one_line_naming_the_fix(az, cache, demo_shards):  # noqa: F811
    with pytest.raises(RemoteError, match="no such container") as e:
        open_pack(f"az://no-such-container-{uuid.uuid4().hex[:6]}/pack")
    assert "\n" not in str(e.value)
    with pytest.raises(RemoteError, match=r"manifest.json is missing.*upload one with `python tools/pack.py"):
        open_pack(f"az://{CONTAINER}/nothing-here")
    assert Remote("az://cont/p").remove_command("x/.crackio.lock") == (
        "az storage blob delete --container-name cont --name p/x/.crackio.lock"
    )


@pytest.mark.slow
def test_a_run_on_an_azure_pack_trains_the_local_run_s_weights(az, cache, demo_shards, tmp_path):  # noqa: F811
    from train.run.main import main

    url = to_azure(demo_shards)
    for name, shards in (("local", str(demo_shards)), ("azure", url)):
        main(tiny(shards, tmp_path / name, epochs=1, limit_batches=4, batch_size=8, quiet=True))
    local, azure = (torch.load(tmp_path / n / "last.pt", weights_only=True) for n in ("local", "azure"))
    assert all(torch.equal(local["model"][k], azure["model"][k]) for k in local["model"])
    rows = [without_timing(c["history"]) for c in (local, azure)]
    assert rows[0] == rows[1]
    assert json.loads((tmp_path / "azure" / "config.json").read_text())["shards"] == [url]


def test_gs_urls_reach_obstore_s_gcs_client_configured_by_google_s_variables(tmp_path, monkeypatch, cache):  # noqa: F811
    """Without an emulator: a service-account file that points GCS's client at a closed local port (the
    emulator setup obstore documents), so the request fails as a network fault and is retried to the deadline."""
    closed = servers.free_port()
    account = tmp_path / "gcs.json"
    account.write_text(
        json.dumps({"gcs_base_url": f"http://127.0.0.1:{closed}", "disable_oauth": True, "client_email": "",
                    "private_key": "", "private_key_id": ""})
    )  # fmt: skip
    monkeypatch.setenv("GOOGLE_SERVICE_ACCOUNT", str(account))
    remote = Remote("gs://bucket/pack", timeout=0.3)
    with pytest.raises(Unreachable, match=r"reading gs://bucket/pack/manifest.json failed \d+ times"):
        remote.get("manifest.json")
    assert remote.remove_command("a") == "gcloud storage rm gs://bucket/pack/a"
    with pytest.raises(ConfigError, match="names no bucket, container or host"):
        Remote("gs:///pack")


def test_a_remote_pack_of_each_store_is_written_only_to_a_store():
    for url in ("s3://b/p", "gs://b/p", "az://cont/p"):
        Remote(url).check_writable()
    for bad in ("az://Packs/p", "az://pa_cks/p", "az://ab/p", "az://a--b/p"):
        with pytest.raises(ConfigError, match="is not an Azure container name"):
            Remote(bad)
    with pytest.raises(ConfigError, match="upload to s3://, gs:// or az:// instead"):
        Remote("https://example.org/p").check_writable()
