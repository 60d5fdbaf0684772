"""The on-disk contract that writers and readers meet at: file names and layout (`layout`), the index's
columns (`schema`), the manifest (`manifest`), one shard's writer (`tar`), the validating index reader
(`index`) and `verify`. Imports NumPy only."""
