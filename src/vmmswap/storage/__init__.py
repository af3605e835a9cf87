"""The store tier: snapshot memory as content-addressed chunks in an object store.

Layering: this package sits beside :mod:`vmmswap.snapshot` (the same height, above the data
plane). It may import :mod:`vmmswap.kernel`, :mod:`vmmswap.uffd`, :mod:`vmmswap.dataplane`
and the snapshot package's :mod:`~vmmswap.snapshot.source` seam; never the VM or the CLI.

* :mod:`.store`        the object-store protocol, its errors, a local-directory backend
* :mod:`.s3`           the S3 backend (obstore; the optional ``vmmswap[s3]`` extra)
* :mod:`.manifest`     the manifest: each region's chunks, written last
* :mod:`.upload`       chunking, hashing, parallel resumable uploads, diffs
* :mod:`.cache`        the bounded on-disk chunk cache
* :mod:`.chunk_source` ChunkSource: a MemorySource fetching verified chunks on demand
"""
