"""The manifest: which chunks make up a snapshot's memory file, written after every chunk.

A snapshot in the store is a key prefix holding ``manifest.json`` (and any small files beside
it, such as the VM state). Its chunks live in a *pool* shared by every snapshot of the guest
(by default the sibling prefix ``chunks``: ``s3://b/vm1/monday`` and ``s3://b/vm1/tuesday``
share ``s3://b/vm1/chunks``), each under the hex SHA-256 of its bytes, so an unchanged chunk is
stored once however many snapshots use it.

The memory file is Firecracker's layout, regions back to back. Each region is cut into
``chunk_size`` pieces from its own start (the last one may be short); a piece of zeros is
``null`` in the manifest and is not stored at all.

Why written last: an upload that stops midway (killed, store gone) leaves chunks but no
manifest, and :func:`load_manifest` refuses a prefix without one -- a half-done upload is never
taken for a snapshot. Chunks are content-addressed, so the leftovers are simply reused by the
upload that resumes it.

SHA-256 rather than BLAKE2b: with the CPU's SHA extensions hashlib does 1.6 GB/s against
BLAKE2b's 0.8 GB/s here (1 MiB buffers), and hashlib releases the GIL for both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Final

from vmmswap.storage.patch import PatchError, parse_page_map, patch_bytes
from vmmswap.storage.store import ObjectMissing, ObjectStore, join

FORMAT: Final = "vmmswap-chunked-memory/1"
#: A manifest with patched chunks: a reader of FORMAT alone would look for whole chunks that
#: were never stored (and wait for ever), so it must refuse these.
FORMAT_PATCHED: Final = "vmmswap-chunked-memory/2"
HASH: Final = "sha256"
MANIFEST: Final = "manifest.json"
#: Measured on SeaweedFS over loopback (benchmarks/bench_store.py, DESIGN.md "The store tier").
DEFAULT_CHUNK_SIZE: Final = 1024 * 1024
_HEX_LEN: Final = 64


class ManifestError(ValueError):
    """Not a snapshot: no manifest, or one that does not describe a memory file."""


def chunk_hash(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class ChunkPatch:
    """How a chunk is stored when it is a patch (:mod:`.patch`): the patch object ``patch``
    (its SHA-256, ``nbytes`` long) over the whole chunk ``base``; ``pages`` is the patch's page
    map (hex, see ``patch.page_map_hex``), which the next diff of this chunk extends."""

    base: str
    patch: str
    pages: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class ChunkedRegion:
    """``size`` bytes at ``offset`` of the memory file, as chunk hashes (None: all zeros).
    ``patches`` is empty, or one entry per chunk: None where the chunk is stored whole under
    its hash, else how it is stored as a patch (its hash still names its content)."""

    offset: int
    size: int
    chunks: tuple[str | None, ...]
    patches: tuple[ChunkPatch | None, ...] = ()

    def chunk_span(self, index: int, chunk_size: int) -> tuple[int, int]:
        """File offset and length of chunk ``index``."""
        start = index * chunk_size
        return self.offset + start, min(chunk_size, self.size - start)

    def patch_of(self, index: int) -> ChunkPatch | None:
        return self.patches[index] if self.patches else None


@dataclass(frozen=True, slots=True)
class Manifest:
    chunk_size: int
    regions: tuple[ChunkedRegion, ...]
    #: Key prefix (in the same store) of the chunk pool.
    pool: str
    #: Small files of the snapshot (VM state, working set): name -> key.
    files: dict[str, str] = field(default_factory=dict)
    #: The snapshot this one was uploaded as a diff of, for the record.
    parent: str | None = None

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def chunk_key(self, digest: str) -> str:
        return join(self.pool, digest)

    def digests(self) -> set[str]:
        return {c for r in self.regions for c in r.chunks if c is not None}

    def objects(self) -> dict[str, int]:
        """The pool's objects this snapshot refers to (hash -> bytes): whole chunks (a patched
        chunk's root is one) and patches. Two snapshots store the union of theirs."""
        sizes: dict[str, int] = {}
        for region in self.regions:
            for i, digest in enumerate(region.chunks):
                patch = region.patch_of(i)
                if patch is not None:
                    sizes[patch.base] = region.chunk_span(i, self.chunk_size)[1]
                    sizes[patch.patch] = patch.nbytes
                elif digest is not None:
                    sizes[digest] = region.chunk_span(i, self.chunk_size)[1]
        return sizes

    def stored_bytes(self) -> int:
        """Bytes of the distinct objects of the pool this snapshot refers to."""
        return sum(self.objects().values())

    @property
    def patched(self) -> int:
        """Chunks stored as patches."""
        return sum(p is not None for r in self.regions for p in r.patches)

    def to_json(self) -> bytes:
        regions = []
        for r in self.regions:
            entry: dict[str, Any] = {"offset": r.offset, "size": r.size, "chunks": list(r.chunks)}
            patches = {str(i): {"base": p.base, "patch": p.patch, "pages": p.pages,
                                "bytes": p.nbytes}
                       for i, p in enumerate(r.patches) if p is not None}
            if patches:
                entry["patches"] = patches
            regions.append(entry)
        doc: dict[str, Any] = {
            "format": FORMAT_PATCHED if self.patched else FORMAT, "hash": HASH,
            "chunk_size": self.chunk_size, "pool": self.pool, "size": self.size,
            "parent": self.parent, "files": self.files, "regions": regions}
        return json.dumps(doc, indent=0, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "manifest") -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("format") not in (FORMAT, FORMAT_PATCHED) or doc.get("hash") != HASH:
                raise ManifestError(f"{where}: format {doc.get('format')!r}/"
                                    f"{doc.get('hash')!r}, expected {FORMAT}/{HASH}")
            may_patch = doc["format"] == FORMAT_PATCHED
            chunk_size = int(doc["chunk_size"])
            if chunk_size <= 0 or chunk_size % 4096:
                raise ManifestError(f"{where}: chunk size {chunk_size} is not a positive "
                                    "multiple of 4 KiB")
            regions = []
            at = 0
            for r in doc["regions"]:
                chunks = tuple(None if c is None else str(c) for c in r["chunks"])
                if "patches" in r and not may_patch:
                    raise ManifestError(f"{where}: patches in a {FORMAT} manifest")
                region = ChunkedRegion(int(r["offset"]), int(r["size"]), chunks,
                                       _parse_patches(r.get("patches"), chunks, chunk_size,
                                                      int(r["size"]), where))
                if region.offset != at or region.size <= 0:
                    raise ManifestError(f"{where}: regions must be back to back from 0 "
                                        f"(region at {region.offset:#x}, expected {at:#x})")
                if len(region.chunks) != -(-region.size // chunk_size):
                    raise ManifestError(f"{where}: region at {region.offset:#x} has "
                                        f"{len(region.chunks)} chunks for {region.size} bytes")
                for c in region.chunks:
                    if c is not None and (len(c) != _HEX_LEN or c.strip("0123456789abcdef")):
                        raise ManifestError(f"{where}: bad chunk hash {c!r}")
                regions.append(region)
                at += region.size
            pool = str(doc["pool"])
            if not _safe_key(pool):
                raise ManifestError(f"{where}: pool {pool!r} is not a plain key prefix")
            files = {str(k): str(v) for k, v in doc.get("files", {}).items()}
            for name, key in files.items():
                if not _safe_key(key) or _file_digest(key) is None:
                    raise ManifestError(f"{where}: file {name!r} at {key!r} is not a "
                                        "content-addressed key of this format")
            manifest = cls(chunk_size, tuple(regions), pool, files, doc.get("parent"))
            if int(doc["size"]) != manifest.size:
                raise ManifestError(f"{where}: size {doc['size']} != regions' {manifest.size}")
            return manifest
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ManifestError(f"{where}: malformed manifest: {err!r}") from None


def _is_hex(text: object) -> bool:
    return isinstance(text, str) and len(text) == _HEX_LEN and not text.strip(
        "0123456789abcdef")


def _parse_patches(doc: Any, chunks: tuple[str | None, ...], chunk_size: int, size: int,
                   where: str) -> tuple[ChunkPatch | None, ...]:
    """A region's ``patches`` ({index: {base, patch, pages, bytes}}), checked; () if none."""
    if doc is None:
        return ()
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: patches must map chunk indexes to patches")
    out: list[ChunkPatch | None] = [None] * len(chunks)
    for key, p in doc.items():
        i = int(key)
        if not 0 <= i < len(chunks) or chunks[i] is None:
            raise ManifestError(f"{where}: a patch for chunk {key}, which is not a stored chunk")
        if not (_is_hex(p["base"]) and _is_hex(p["patch"])):
            raise ManifestError(f"{where}: chunk {i}'s patch names bad hashes")
        length = min(chunk_size, size - i * chunk_size)
        try:
            pages = parse_page_map(str(p["pages"]), length // 4096)
        except PatchError as err:
            raise ManifestError(f"{where}: chunk {i}'s patch: {err}") from None
        nbytes = int(p["bytes"])
        if nbytes != patch_bytes(length, int(pages.sum())):
            raise ManifestError(f"{where}: chunk {i}'s patch of {int(pages.sum())} pages "
                                f"cannot be {nbytes} bytes")
        out[i] = ChunkPatch(p["base"], p["patch"], str(p["pages"]), nbytes)
    return tuple(out)


def _safe_key(key: str) -> bool:
    """A relative key without empty, ``.`` or ``..`` parts (a store directory is a path)."""
    parts = key.split("/")
    return bool(key) and not key.startswith("/") and all(p not in ("", ".", "..")
                                                         for p in parts)


def file_key(prefix: str, name: str, data: bytes | bytearray | memoryview) -> str:
    """Where a snapshot's small file goes: named by its hash as well, so that parking again to
    the same prefix never changes a file an older manifest still names (the manifest, written
    last, switches to the new files at once)."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"file name {name!r}: one plain name")
    return join(prefix, f"{name}.{chunk_hash(data)}")


def _file_digest(key: str) -> str | None:
    digest = key.rpartition(".")[2]
    return digest if len(digest) == _HEX_LEN and not digest.strip("0123456789abcdef") else None


def load_file(store: ObjectStore, manifest: Manifest, name: str) -> bytes:
    """A small file of the snapshot, checked against the hash its key carries."""
    key = manifest.files.get(name)
    if key is None:
        raise ManifestError(f"the snapshot has no file {name!r}")
    data = store.get(key)
    if chunk_hash(data) != _file_digest(key):
        raise ManifestError(f"{store.url}/{key}: content does not match its hash")
    return data


def default_pool(prefix: str) -> str:
    """The chunk pool beside a snapshot prefix: ``vm1/monday`` -> ``vm1/chunks``."""
    parent = prefix.strip("/").rpartition("/")[0]
    return join(parent, "chunks")


def load_manifest(store: ObjectStore, prefix: str) -> Manifest:
    """The snapshot at ``prefix``; ManifestError when there is none (e.g. an upload that never
    finished) or it is malformed."""
    key = join(prefix, MANIFEST)
    try:
        data = store.get(key)
    except ObjectMissing:
        raise ManifestError(f"{store.url}/{prefix}: no snapshot here (no {MANIFEST}: never "
                            "uploaded, or its upload did not finish)") from None
    return Manifest.from_json(data, f"{store.url}/{key}")


def save_manifest(store: ObjectStore, prefix: str, manifest: Manifest) -> None:
    store.put(join(prefix, MANIFEST), manifest.to_json())
