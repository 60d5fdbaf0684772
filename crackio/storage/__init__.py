"""Where a pack lives: a local folder, or object storage (S3-compatible) and HTTP(S) servers read through a
bounded cache per node. `packs.open_pack` turns a `--shards` value into a `Pack`; `remote` holds the protocol and
the fault policy, `cache` the node's LRU cache, `upload` what puts a pack into a bucket. Reads
`crackio.format`; never imports the loading or writing side."""
