"""KV cache addressing, layouts and storage (torch-free).

- :mod:`.hashing`: chained hashes of 64-token Full Blocks (block names);
- :mod:`.index`: prefix index (trie by chained hash) with reference counts;
- :mod:`.layout`: Full Block ``[layers, tokens, bytes]`` / Layer Block ``[1, tokens, bytes]`` views;
- :mod:`.storage`: the async ``BlockStore`` interface, in-memory backend, store metrics, ``open_store``;
- :mod:`.filestore`: the filesystem backend (atomic, checksummed objects);
- :mod:`.readqueue`: the bounded, observable storage read queue.
"""
