"""The calling convention of a compiled artifact, shared by the compiler, the runtime and the tools.

A call takes six arrays in this order: species (atoms,) int64 indices into the model's species,
pos (atoms, 3) float32, mol (atoms,) int64, src (edges,) int64, dst (edges,) int64, mol_slots
(molecules,) float32 (zeros: its length is the molecule count). Outputs: energy (molecules,) without
the per-element shifts, forces (atoms, 3).

Every call appends a ghost molecule (two atoms of the first species, 1 Å apart) so that the atom, edge
and molecule counts are never 0 or 1, the sizes torch.export specializes; its outputs are dropped. Edges come
in pairs (i -> j and j -> i: the radial filter is computed once per pair, nn.ops.pairs), grouped by receiving
atom; a call has at least two pairs (a call whose only edges are the ghost's repeats the ghost pair).

Specialized functions: a symbolic library can also hold copies of `main`/`energy` at static sizes
(`main_b12_80_2`, ...; manifest `inputs.specialized`). A call that fits one of those buckets is padded
to the smallest and runs the static copy (memory planned at compile time, no shape arithmetic at run
time: ~2x faster on small molecules); other calls run the symbolic function.

Static builds (tuned, `--bucket`) have fixed sizes: a bucket (atoms, edges, molecules) is the padded
size of every call: the real molecules, the ghost molecule plus every padding atom (each ≥ 2×cutoff
from everything else, so they have no neighbours), padding edges that repeat the ghost pair (both directions,
inserted so that edges stay grouped by receiver), and empty molecule slots (energy 0). A call needs atoms + 2,
edges + 2 and molecules + 1 slots; a bucket's edge count is even (pairs).

The manifest's `inputs` section records which of the two a library is (`dynamic_inputs`, `static_inputs`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import BucketError, QSO3Error
from ..files import sha256
from .molecules import MoleculeSet
from .neighbors import graph_arrays

MANIFEST = "manifest.json"
# the library's functions (same inputs): what each returns
ENTRY_POINTS = {"main": "energy (molecules,), forces (atoms, 3)", "energy": "energy (molecules,)"}
INPUT_NAMES = ("species", "pos", "mol", "src", "dst", "mol_slots")
CALL_DIMS = ("atoms", "edges", "molecules")
GHOST_ATOMS, GHOST_EDGES = 2, 2
MIN_EDGES = 4  # two pairs: torch.export would specialize a pair count of 0 or 1
# documented buckets (README, reports/tuning.md): the calls of the bench's ethanol-b1, aspirin-b1 and qm9-b32
# workloads (room_for each, ghost included), so that databases tuned at them serve those calls
NAMED_BUCKETS = {
    "ethanol": (12, 80, 2),  # ethanol batch 1: 9 atoms, 72 edges (+2 ghost atoms, +2 ghost edges, +1 ghost molecule)
    "aspirin": (24, 312, 2),  # aspirin batch 1: 21 atoms, ~295 edges
    "qm9-32": (588, 9640, 33),  # 32 QM9 molecules of 16-20 atoms (~560 atoms, ~9,100 edges)
}


# ----------------------------------------------------------------------------- buckets
@dataclass(frozen=True)
class Bucket:
    atoms: int
    edges: int
    molecules: int

    @classmethod
    def parse(cls, spec) -> "Bucket":
        """'ATOMS,EDGES,MOLS', a named bucket (ethanol, aspirin, qm9-32), a list/tuple or a Bucket."""
        if isinstance(spec, Bucket):
            return spec
        if isinstance(spec, str):
            spec = NAMED_BUCKETS.get(spec.strip(), spec)
        try:
            vals = [int(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
        except (TypeError, ValueError):
            vals = []
        if len(vals) != 3:
            raise QSO3Error(f"bucket must be ATOMS,EDGES,MOLECULES (or one of {', '.join(NAMED_BUCKETS)}), not {spec!r}")
        b = cls(*vals)
        if b.atoms < 3 or b.edges < MIN_EDGES or b.molecules < 2:
            raise QSO3Error(f"bucket {b.text}: needs ≥ 3 atoms, ≥ {MIN_EDGES} edges, ≥ 2 molecules (room for the ghost molecule)")
        if b.edges % 2:
            raise QSO3Error(f"bucket {b.text}: the edge count must be even (edges come in pairs i -> j, j -> i)")
        return b

    @property
    def text(self) -> str:
        return f"{self.atoms},{self.edges},{self.molecules}"

    def as_list(self) -> list[int]:
        return [self.atoms, self.edges, self.molecules]

    def fits(self, atoms: int, edges: int, molecules: int) -> bool:
        """Room for real atoms/edges/molecules plus the ghost pair (2 atoms, 2 edges, 1 molecule)."""
        return atoms + 2 <= self.atoms and edges + 2 <= self.edges and molecules + 1 <= self.molecules


def choose_bucket(buckets, atoms: int, edges: int, molecules: int) -> Bucket | None:
    """The smallest bucket (by atoms, then edges) the call fits in, or None."""
    fitting = [b for b in map(Bucket.parse, buckets) if b.fits(atoms, edges, molecules)]
    return min(fitting, key=lambda b: (b.atoms, b.edges, b.molecules)) if fitting else None


def pad_to_bucket(arrays: list, buckets, cutoff: float, where: str) -> list:
    """A call's graph arrays (species, pos, mol, src, dst, mol_slots; the 2-atom ghost molecule last)
    padded to the smallest bucket that fits; BucketError names the limits otherwise."""
    n, e, molecules = len(arrays[0]) - 2, len(arrays[3]) - 2, len(arrays[5]) - 1
    bucket = choose_bucket(buckets, n, e, molecules)
    if bucket is None:
        raise BucketError(f"{molecules} molecule(s) with {n} atoms and {e} edges exceed every size bucket "
                          f"of {where} ({buckets} as atoms,edges,molecules incl. a 2-atom ghost); "
                          "compile with a larger --bucket or use an untuned (dynamic) build")
    return list(pad_arrays(*arrays[:5], molecules + 1, bucket, cutoff, ghost=(n, n + 1)))


def pad_arrays(species, pos, mol, src, dst, n_mol: int, bucket: Bucket, cutoff: float, ghost: tuple[int, int] | None = None):
    """Pad graph arrays to a bucket. `ghost` is the (i, j) atom pair of an existing ghost molecule
    (the last molecule) whose edges are repeated (repeat_pair); None when the arrays have no ghost yet (export):
    then atoms are padded onto the last molecule and edges repeat its first pair.
    Returns (species, pos, mol, src, dst, mol_slots) as numpy arrays of the bucket's sizes."""
    n, e = len(species), len(src)
    if n > bucket.atoms or e > bucket.edges or n_mol > bucket.molecules or e == 0:
        raise QSO3Error(f"{n} atoms / {e} edges / {n_mol} molecules do not fit bucket {bucket.text}")
    k = bucket.atoms - n
    gap = 2.0 * cutoff + 1.0  # ≥ 2×cutoff (with a margin for float32) from everything and each other
    extra_pos = np.zeros((k, 3), pos.dtype)
    extra_pos[:, 0] = float(np.abs(pos).max(initial=0.0)) + gap * np.arange(1, k + 1)
    if (bucket.edges - e) % 2:
        raise QSO3Error(f"{e} edges cannot be padded to {bucket.edges}: edges come in pairs (an odd count is not a "
                        "neighbor list)")
    src, dst = repeat_pair(src, dst, ghost if ghost is not None else (int(src[0]), int(dst[0])), (bucket.edges - e) // 2)
    return (np.concatenate([species, np.full(k, species[-1], species.dtype)]),
            np.concatenate([pos, extra_pos]),
            np.concatenate([mol, np.full(k, n_mol - 1, mol.dtype)]),
            src, dst, np.zeros(bucket.molecules, pos.dtype))


def repeat_pair(src, dst, pair: tuple[int, int], times: int):
    """Edges with `times` more copies of both edges of an atom pair, each inserted after the last edge into its
    receiver: edges grouped by receiving atom stay so (the messages kernel's per-receiver pass), and every
    edge keeps a reverse (the per-pair radial filter, nn.ops.pairs)."""
    for a, b in (pair, pair[::-1]):  # copies of b -> a into receiver a
        at = int(np.searchsorted(dst, a, side="right")) if np.all(dst[1:] >= dst[:-1]) else len(dst)
        src, dst = np.insert(src, at, np.full(times, b, src.dtype)), np.insert(dst, at, np.full(times, a, dst.dtype))
    return src, dst


def bucket_function(entry: str, bucket: Bucket) -> str:
    """The library function of an entry point specialized to a bucket (e.g. main_b12_80_2)."""
    return f"{entry}_b{bucket.atoms}_{bucket.edges}_{bucket.molecules}"


def call_function(manifest: dict, entry: str, arrays) -> str:
    """The library function to run for a call's arrays: the entry's copy specialized to exactly these
    sizes when the library has one, else the entry itself."""
    sizes = tuple(int(arrays[i].shape[0]) for i in (0, 3, 5))
    for b in manifest.get("inputs", {}).get("specialized") or []:
        if tuple(b) == sizes:
            return bucket_function(entry, Bucket(*b))
    return entry


def pad_to_specialized(arrays: list, manifest: dict, cutoff: float) -> list:
    """A call's arrays padded to the smallest specialized bucket they fit (unchanged when none fits)."""
    specialized = manifest.get("inputs", {}).get("specialized")
    if not specialized:
        return arrays
    try:
        return pad_to_bucket(arrays, specialized, cutoff, "the specialized buckets")
    except BucketError:
        return arrays


def sample_buckets(species: tuple[int, ...], cutoff: float) -> list[Bucket]:
    """One bucket per packaged sample molecule the model covers, for one call on it (`room_for` its
    largest frame, ghost included); buckets within 20 % of a larger one are left to it."""
    sizes = {}
    for name, numbers, positions in sample_molecules(species):
        n = call_sizes(numbers, positions, species, cutoff)
        a, e = sizes.get(name.split("[")[0], (0, 0))
        sizes[name.split("[")[0]] = (max(a, n["atoms"]), max(e, n["edges"]))
    return merge_buckets([room_for(a, e, 2) for a, e in sizes.values()])


def merge_buckets(buckets) -> list[Bucket]:
    """Distinct buckets, sorted, without those within 20 % of a larger one (it takes their calls)."""
    buckets = set(map(Bucket.parse, buckets))
    return sorted((b for b in buckets if not any(_covers(c, b) for c in buckets)), key=lambda b: b.as_list())


def room_for(atoms: int, edges: int, molecules: int) -> Bucket:
    """A bucket for calls of these sizes (ghost included) with room to spare: atoms to a multiple of 4,
    edges +5 % to a multiple of 8 (other conformations have more pairs inside the cutoff)."""
    return Bucket(-(-atoms // 4) * 4, -(-int(edges * 1.05) // 8) * 8, molecules)


def _covers(big: Bucket, small: Bucket) -> bool:
    """Whether `small` may be dropped for `big`: another bucket that fits its calls for ≤ 20 % more work."""
    return (big != small and big.atoms >= small.atoms and big.edges >= small.edges
            and big.atoms * big.edges <= 1.2 * small.atoms * small.edges)


def with_ghost(mols: MoleculeSet, frames, species: tuple[int, ...]) -> tuple[MoleculeSet, list[int]]:
    """The chosen frames plus a ghost molecule of two atoms of the first species."""
    parts = [mols.frame(int(f)) for f in frames]
    ghost = (np.full(GHOST_ATOMS, species[0]), np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    return MoleculeSet.from_molecules(parts + [ghost]), list(range(len(parts) + 1))


def call_arrays(mols: MoleculeSet, frames, species: tuple[int, ...], cutoff: float, buckets=None,
                where: str = "the artifact") -> tuple[list[np.ndarray], MoleculeSet]:
    """The six input arrays of one call on the frames (plus the ghost molecule, padded to the smallest
    fitting bucket when `buckets` are given), and the frames with the ghost."""
    padded, idx = with_ghost(mols, list(frames), species)
    g = graph_arrays(padded, idx, species, cutoff)
    src, dst = g.src, g.dst
    if len(src) < MIN_EDGES:  # the ghost's pair only: repeated
        n = len(g.species)
        src, dst = repeat_pair(src, dst, (n - 2, n - 1), (MIN_EDGES - len(src)) // 2)
    arrays = [g.species, g.pos.astype(np.float32), g.mol, src, dst, np.zeros(g.n_mol, np.float32)]
    if buckets:
        arrays = pad_to_bucket(arrays, buckets, cutoff, where)
    return arrays, padded


def call_sizes(numbers: np.ndarray, positions: np.ndarray, species: tuple[int, ...], cutoff: float) -> dict[str, int]:
    """Atom, edge and molecule counts of one call on a molecule (the molecule plus the ghost)."""
    arrays, _ = call_arrays(MoleculeSet.from_molecules([(numbers, positions)]), [0], species, cutoff)
    return {"atoms": len(arrays[0]), "edges": len(arrays[3]), "molecules": len(arrays[5])}


def fits_buckets(buckets, numbers: np.ndarray, positions: np.ndarray, species, cutoff: float) -> bool:
    """Whether one molecule (as one call, ghost included) fits one of the buckets."""
    sizes = call_sizes(numbers, positions, species, cutoff)
    return choose_bucket(buckets, sizes["atoms"] - GHOST_ATOMS, sizes["edges"] - GHOST_EDGES, 1) is not None


def check_call_size(manifest: dict, numbers: np.ndarray, positions: np.ndarray) -> None:
    """Refuse a molecule outside the artifact's limits: manifest["inputs"]["bounds"] ({dim: [lo, hi]},
    hi None = unbounded) and, when present, static "buckets" (each [atoms, edges, molecules] or
    {dim: max}, sizes of a whole call including the ghost: one must fit)."""
    inputs = manifest.get("inputs", {})
    bounds = inputs.get("bounds", {})
    buckets = [b if isinstance(b, dict) else dict(zip(CALL_DIMS, b)) for b in inputs.get("buckets") or []]
    limited = buckets or any(hi is not None for _, hi in bounds.values())
    if not limited:
        return
    sizes = call_sizes(numbers, positions, tuple(manifest["model"]["species"]), float(manifest["model"]["cutoff"]))
    for dim, (lo, hi) in bounds.items():
        n = sizes.get(dim)
        if n is not None and ((lo is not None and n < lo) or (hi is not None and n > hi)):
            raise QSO3Error(f"molecule too large for this artifact: {n} {dim} per call (molecule + 2-atom ghost) "
                            f"outside the compiled bounds [{lo}, {hi}]")
    if buckets and not any(all(sizes.get(d, 0) <= m for d, m in b.items() if m is not None) for b in buckets):
        raise QSO3Error(f"molecule does not fit any compiled size bucket: needs {sizes} (molecule + 2-atom ghost), "
                        f"buckets {buckets}")


# ----------------------------------------------------------------------------- manifest
def dynamic_inputs() -> dict:
    """The manifest's `inputs` section of a library with symbolic sizes."""
    return {"species": ["atoms"], "pos": ["atoms", 3], "mol": ["atoms"], "src": ["edges"], "dst": ["edges"],
            "mol_slots": ["molecules"], "bounds": {"atoms": [2, None], "edges": [MIN_EDGES, None], "molecules": [2, None]},
            "note": "symbolic shapes: one library serves any molecule size; a ghost molecule pads each call"}


def static_inputs(bucket: Bucket) -> dict:
    """The manifest's `inputs` section of a library built at one static bucket."""
    return {"species": [bucket.atoms], "pos": [bucket.atoms, 3], "mol": [bucket.atoms],
            "src": [bucket.edges], "dst": [bucket.edges], "mol_slots": [bucket.molecules],
            "buckets": [bucket.as_list()],
            "note": "static shapes: every call is padded to a bucket (atoms, edges, molecules) with a ghost "
                    "molecule; a call needs atoms+2, edges+2, molecules+1 slots"}


REQUIRED_KEYS = {"format": str, "library": str, "library_sha256": str, "model": dict, "target": dict, "inputs": dict}
REQUIRED_MODEL_KEYS = ("species", "cutoff", "precision")


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's own fields (canonical JSON without `manifest_sha256`)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    """manifest.json with its checksum (`manifest_sha256`)."""
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(path: Path) -> dict:
    """The manifest of an artifact folder, checked: parseable, the keys the runtime needs, its checksum."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise QSO3Error(f"{path}: not a compiled artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QSO3Error(f"{manifest_path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise QSO3Error(f"{manifest_path}: corrupt manifest (not a JSON object)")
    bad = [k for k, t in REQUIRED_KEYS.items() if not isinstance(manifest.get(k), t)]
    bad += [f"model.{k}" for k in REQUIRED_MODEL_KEYS if isinstance(manifest.get("model"), dict) and k not in manifest["model"]]
    if bad:
        raise QSO3Error(f"{manifest_path}: manifest lacks or mistypes {bad} (not made by qso3-tvm compile, or edited)")
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise QSO3Error(f"{manifest_path}: manifest checksum mismatch: it was edited after compile "
                        "(or made by an older qso3-tvm): recompile the artifact")
    return manifest


def library_path(path: Path, manifest: dict) -> Path:
    """The artifact's library, verified before anything loads it: a plain file inside the artifact folder
    whose sha256 is the manifest's (a swapped, tampered or truncated library is refused)."""
    name = manifest["library"]
    if not name or name != Path(name).name or name in (".", ".."):
        raise QSO3Error(f"{path}/{MANIFEST}: library {name!r} must be a plain file name inside the artifact folder")
    lib = Path(path) / name
    if lib.is_symlink() or not lib.is_file():
        raise QSO3Error(f"{lib}: library missing or not a regular file")
    if sha256(lib) != manifest["library_sha256"]:
        raise QSO3Error(f"{lib}: sha256 differs from the manifest's: the library was changed or truncated after "
                        "compile; refusing to load it (recompile the artifact)")
    return lib


def sample_molecules(species: tuple[int, ...]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, numbers, positions) of the packaged sample frames whose elements the model knows."""
    out = []
    with np.load(str(resources.files("qso3_tvm") / "models" / "samples.npz")) as npz:
        for key in sorted(k for k in npz.files if k.endswith("_numbers")):
            name = key[: -len("_numbers")]
            numbers, coords = npz[key], npz[f"{name}_coords"]
            if set(numbers.tolist()) <= set(species):
                out += [(f"{name}[{i}]", numbers, c) for i, c in enumerate(coords)]
    return out


def sample_set(species) -> tuple[MoleculeSet, list[str]]:
    samples = sample_molecules(species)
    if not samples:
        raise QSO3Error(f"no packaged sample molecule uses only the model's species {species}")
    return MoleculeSet.from_molecules((z, p) for _, z, p in samples), [s[0] for s in samples]


def float_activations(precision: str) -> bool:
    """Whether a model precision (manifest "precision": fp32, w8a8-mddq, w8, ...) computes in float on
    (dequantized) weights, with no activation codes that can flip between builds: such artifacts are held
    to the fp32 parity bound on every machine."""
    return precision == "fp32" or (precision.startswith("w") and precision[1:].isdigit())


def max_errors(ref: dict, energies: np.ndarray, forces: np.ndarray) -> dict:
    """Max abs deviation from a stored reference, in meV and meV/Å."""
    return {"max_energy_error_mev": float(np.abs(energies - np.asarray(ref["energy_ev"])).max() * 1e3),
            "max_force_error_mev_per_a": float(np.abs(forces - np.asarray(ref["forces_ev_per_a"])).max() * 1e3)}
