"""The writing side: proposal folders (`pack`) and annotated photos (`proposal_stage`) into shards in the
format of `crackio.format`. Never imports torch at import time, nor the loading side."""
