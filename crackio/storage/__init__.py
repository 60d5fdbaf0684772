"""Where a pack lives: a local folder, or object storage (S3-compatible) and HTTP(S) servers read through a
bounded cache per node. `packs.open_pack` turns a location (and its `settings.RemoteSettings`) into a `Pack`;
`remote` holds the protocol and the fault policy, `obstore_errors` the one reading of obstore's error texts,
`cache` the node's LRU cache, `upload` what puts a pack into a bucket. Reads `crackio.format`; never imports the
loading or writing side."""
