"""Converter of a 2D MedMNIST flag (a local npz, or the `medmnist` package's download) into a dataset directory:
single-label flags become classification tasks, ChestMNIST a multi-label one. Corpus = train split with report texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..base.dataset import SPLITS, DatasetError, DatasetMeta, DatasetWriter, sha256_file
from ..base.records import CorpusItem, Query

log = logging.getLogger(__name__)

SIZES = (28, 64, 128, 224)  # the image sides MedMNIST+ publishes for 2D flags
MEDMNIST_CITATION = ("MedMNIST v2 (Yang et al., 'MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D "
                     "biomedical image classification', Scientific Data 10, 41 (2023), doi:10.1038/s41597-022-01721-8; "
                     "https://medmnist.com)")


@dataclass(frozen=True)
class FlagSpec:
    """How one MedMNIST flag becomes a question-answering task.

    `class_names` are MedMNIST's INFO labels verbatim (class index order). `answers` are what a reader must output for
    each class, in the same order; they form the dataset's label set. They are the lower-cased class names, except
    where the question is a yes/no question (disease present?) or a class name is too long to be an answer.
    `findings` are the phrases the report texts use for each class; `meanings` what a legend states for each answer
    (default: the class names). A `multilabel` flag's labels are binary columns, one per class.
    """

    title: str  # MedMNIST's python class name, for citations
    modality: str
    question: str
    class_names: tuple[str, ...]
    answers: tuple[str, ...]
    findings: tuple[str, ...]
    license: str
    meanings: tuple[str, ...] | None = None
    multilabel: bool = False

    def legend(self) -> dict[str, str]:
        return dict(zip(self.answers, self.meanings or self.class_names))

    @property
    def numbered(self) -> bool:
        return all(a.isdigit() for a in self.answers)


def _named(title: str, modality: str, question: str, class_names: tuple[str, ...], license: str = "CC BY 4.0",
           answers: tuple[str, ...] | None = None) -> FlagSpec:
    lowered = tuple(name.lower() for name in class_names)
    return FlagSpec(title, modality, question, class_names, answers or lowered, lowered, license)


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen")

# Binary disease flags use yes/no answers: the question asks whether a disease is present (docs/design.md's BreastMNIST
# question), and "normal, benign" is not an answer to it. Multi-class flags answer with the class name.
FLAGS: dict[str, FlagSpec] = {
    "breastmnist": FlagSpec(
        "BreastMNIST", "breast ultrasound", "Does this breast ultrasound image show signs of cancer?",
        ("malignant", "normal, benign"), ("yes", "no"),
        ("a malignant lesion", "normal breast tissue or a benign lesion"), "CC BY 4.0"),
    "pneumoniamnist": FlagSpec(
        "PneumoniaMNIST", "pediatric chest X-ray", "Does this chest X-ray show signs of pneumonia?",
        ("normal", "pneumonia"), ("no", "yes"), ("clear lungs without pneumonia", "pneumonia"), "CC BY 4.0"),
    "retinamnist": FlagSpec(
        "RetinaMNIST", "retinal fundus photograph", "What is the severity of diabetic retinopathy?",
        ("0", "1", "2", "3", "4"), ("0", "1", "2", "3", "4"),
        ("no diabetic retinopathy (grade 0)", "mild non-proliferative diabetic retinopathy (grade 1)",
         "moderate non-proliferative diabetic retinopathy (grade 2)",
         "severe non-proliferative diabetic retinopathy (grade 3)", "proliferative diabetic retinopathy (grade 4)"),
        "CC BY 4.0",
        meanings=("No diabetic retinopathy", "Mild non-proliferative diabetic retinopathy",
                  "Moderate non-proliferative diabetic retinopathy", "Severe non-proliferative diabetic retinopathy",
                  "Proliferative diabetic retinopathy")),
    "dermamnist": _named(
        "DermaMNIST", "dermatoscopic image", "What type of skin lesion does the patient have?",
        ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis-like lesions",
         "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"), license="CC BY-NC 4.0"),
    "bloodmnist": _named(
        "BloodMNIST", "blood cell microscopy image", "What type of blood cell is shown?",
        ("basophil", "eosinophil", "erythroblast",
         "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
         "neutrophil", "platelet"),
        answers=("basophil", "eosinophil", "erythroblast", "immature granulocyte", "lymphocyte", "monocyte",
                 "neutrophil", "platelet")),
    "pathmnist": _named(
        "PathMNIST", "colorectal histology patch (H&E)", "What type of tissue is shown in this histology image?",
        ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
         "cancer-associated stroma", "colorectal adenocarcinoma epithelium")),
    "octmnist": _named(
        "OCTMNIST", "retinal OCT scan", "What does this retinal OCT scan show?",
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal")),
    "tissuemnist": _named(
        "TissueMNIST", "kidney cortex microscopy image", "What type of kidney tissue or cell is shown?",
        ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
         "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
         "Thick Ascending Limb")),
    "organamnist": _named("OrganAMNIST", "abdominal CT slice (axial view)",
                          "Which organ is shown in this abdominal CT image?", _ORGANS),
    "organcmnist": _named("OrganCMNIST", "abdominal CT slice (coronal view)",
                          "Which organ is shown in this abdominal CT image?", _ORGANS),
    "organsmnist": _named("OrganSMNIST", "abdominal CT slice (sagittal view)",
                          "Which organ is shown in this abdominal CT image?", _ORGANS),
}
# MedMNIST INFO["chestmnist"]["label"] (the 14 ChestX-ray14 findings; "pleural" is pleural thickening), used when
# the medmnist package is not installed.
CHEST_NAMES = ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
               "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia")
MULTI_LABEL_FLAGS = ("chestmnist",)
VOLUME_FLAGS = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d",
                "synapsemnist3d")

_REPORTS = (
    "{Modality}. Findings: {finding}.",
    "{Modality} report. Impression: {finding}.",
    "Reviewed {modality}; the image shows {finding}.",
    "Diagnosis from {modality}: {finding}.",
)


def chest_names() -> tuple[str, ...]:
    """ChestMNIST's finding names: from the medmnist package's INFO when it is installed, else CHEST_NAMES."""
    try:
        from medmnist import INFO
    except ImportError:
        return CHEST_NAMES
    labels = INFO["chestmnist"]["label"]
    names = tuple(str(labels[str(i)]).strip().lower() for i in range(len(labels)))
    if len(names) != len(CHEST_NAMES):
        raise DatasetError(f"medmnist INFO['chestmnist'] lists {len(names)} labels, expected {len(CHEST_NAMES)}")
    return names


def chest_spec() -> FlagSpec:
    names = chest_names()
    return FlagSpec("ChestMNIST", "chest X-ray",
                    "Which of these findings are present in this chest X-ray? Answer with the findings separated by "
                    "commas, or none.", names, names, names, "CC BY 4.0", multilabel=True)


def flag_spec(flag: str) -> FlagSpec:
    """The task definition of a 2D flag; DatasetError for 3D or unknown flags."""
    if flag in FLAGS:
        return FLAGS[flag]
    if flag == "chestmnist":
        return chest_spec()
    supported = ", ".join([*FLAGS, *MULTI_LABEL_FLAGS])
    if flag in VOLUME_FLAGS:
        raise DatasetError(f"--flag {flag}: 3D volumes are not supported; supported 2D flags: {supported}")
    raise DatasetError(f"--flag {flag!r}: unknown MedMNIST flag; supported: {supported}")


def numbered_spec(spec: FlagSpec) -> FlagSpec:
    """The flag with class indices "0".."n-1" as answers (the reference code's DermaMNIST prompt), the class names
    becoming the legend."""
    return dataclasses.replace(spec, answers=tuple(str(i) for i in range(len(spec.class_names))),
                               meanings=spec.meanings or spec.class_names)


def question_text(spec: FlagSpec) -> str:
    """The query question, with the answer options listed (as the embedded synthetic dataset does)."""
    return f"{spec.question} Options: {', '.join(spec.answers)}."


def report_text(spec: FlagSpec, class_index: int | np.ndarray, rng: np.random.Generator) -> str:
    """A templated report of one class, or of a multi-label row (a 0/1 vector) listing its findings."""
    template = _REPORTS[int(rng.integers(len(_REPORTS)))]
    modality = spec.modality
    if spec.multilabel:
        present = [spec.findings[k] for k in np.flatnonzero(class_index)]
        finding = ", ".join(present) if present else "no finding"
    else:
        finding = spec.findings[class_index]
    return template.format(modality=modality, Modality=modality[0].upper() + modality[1:], finding=finding)


def download_npz(flag: str, size: int) -> Path:
    """Fetch `<flag>[_<size>].npz` into ~/.medmnist through the `medmnist` package (needs network access)."""
    try:
        import medmnist
    except ImportError as e:
        raise DatasetError(f"--npz was not given and the 'medmnist' package cannot be imported ({e}); "
                           f"`pip install medmnist` to download {flag}, or pass --npz PATH to a local "
                           f"{flag}.npz") from None
    root = Path.home() / ".medmnist"
    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(medmnist, flag_spec(flag).title)(split="train", download=True, size=size, root=str(root))
    except Exception as e:  # medmnist wraps every network failure in a bare RuntimeError
        raise DatasetError(f"downloading {flag} (size {size}) through medmnist failed: {e}; pass --npz PATH to a "
                           f"local copy") from None
    return root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def read_npz(npz: Path, spec: FlagSpec, size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split name -> (images (N, size, size[, 3]) uint8, labels (N,) int), validated against the flag."""
    if not npz.is_file():
        raise DatasetError(f"{npz}: file not found; pass --npz PATH to a MedMNIST npz, e.g. breastmnist.npz")
    try:
        archive = np.load(npz, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{npz}: not a readable npz archive ({e})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{npz}: holds a single array, expected an npz archive with keys "
                           f"{', '.join(f'{s}_images, {s}_labels' for s in SPLITS)}")
    with archive:
        splits = {}
        for split in SPLITS:
            arrays = []
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in archive.files:
                    raise DatasetError(f"{npz}: missing array '{key}' (has {sorted(archive.files)}); a MedMNIST npz "
                                       f"holds {split}_images and {split}_labels for each of {', '.join(SPLITS)}")
                try:
                    arrays.append(archive[key])
                except (OSError, ValueError, zipfile.BadZipFile) as e:
                    raise DatasetError(f"{npz}: array '{key}' does not decode ({e})") from None
            splits[split] = _check_split(npz, split, *arrays, spec=spec, size=size)
    return splits


def _check_split(npz: Path, split: str, images: np.ndarray, labels: np.ndarray, spec: FlagSpec,
                 size: int) -> tuple[np.ndarray, np.ndarray]:
    key = f"{split}_images"
    if images.dtype != np.uint8:
        raise DatasetError(f"{npz}: array '{key}' has dtype {images.dtype}, expected uint8")
    grayscale = images.ndim == 3
    if not (grayscale or images.ndim == 4 and images.shape[3] == 3):
        raise DatasetError(f"{npz}: array '{key}' has shape {images.shape}, expected (N, H, W) grayscale or "
                           f"(N, H, W, 3) RGB")
    if images.shape[1:3] != (size, size):
        raise DatasetError(f"{npz}: array '{key}' holds {images.shape[1]}x{images.shape[2]} images, expected "
                           f"{size}x{size} (pass --size to match the file)")
    key = f"{split}_labels"
    if spec.multilabel:
        return images, _check_multilabel(npz, key, labels, len(images), spec)
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DatasetError(f"{npz}: array '{key}' has shape {labels.shape}: multi-label data, but {spec.title} is "
                           f"single-label: expected (N,) or (N, 1) class indices (the multi-label flag is chestmnist)")
    if labels.ndim == 2:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{npz}: array '{key}' has shape {labels.shape}, expected ({len(images)},) or "
                           f"({len(images)}, 1) to match '{split}_images'")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{npz}: array '{key}' has dtype {labels.dtype}, expected integer class indices")
    bad = np.flatnonzero((labels < 0) | (labels >= len(spec.class_names)))
    if len(bad):
        i = int(bad[0])
        raise DatasetError(f"{npz}: array '{key}' entry {i}: class {int(labels[i])} is outside 0.."
                           f"{len(spec.class_names) - 1} ({spec.title} classes: {list(spec.class_names)})")
    return images, labels.astype(np.int64)


def _check_multilabel(npz: Path, key: str, labels: np.ndarray, n: int, spec: FlagSpec) -> np.ndarray:
    c = len(spec.class_names)
    if labels.shape != (n, c):
        raise DatasetError(f"{npz}: array '{key}' has shape {labels.shape}, expected ({n}, {c}): one 0/1 column per "
                           f"{spec.title} finding")
    bad = np.argwhere((labels != 0) & (labels != 1))
    if len(bad):
        i, j = (int(x) for x in bad[0])
        raise DatasetError(f"{npz}: array '{key}' entry [{i}, {j}] ({spec.class_names[j]}): value "
                           f"{labels[i, j].item()!r}, expected 0 or 1")
    return labels.astype(bool)


LEGEND_MODES = ("auto", "on", "off")


def convert_medmnist(flag: str, out: Path, npz: Path | None = None, size: int = 28, overwrite: bool = False,
                     max_corpus: int | None = None, seed: int = 0, numbered: bool = False,
                     legend: str = "auto") -> Path:
    """Convert a 2D MedMNIST flag into a dataset directory at `out` (written atomically): task "classification", or
    "multilabel" for ChestMNIST (a query's label = the set of its findings; the empty set, "none", is allowed).

    Corpus: the train split (or a seeded random subset of `max_corpus` items), each with a templated report text and
    the answer of its class as label. Queries: every image of train, val and test. A train query and the corpus item
    of the same image share one image file and `metadata.source_index`, so the pipeline can exclude the query's own
    image from its retrieved items. `seed` picks the report phrasings and the corpus subset.
    `numbered` answers with class indices instead of names. `legend` ("auto": when the answers are numbers, "on",
    "off") writes dataset.yaml `legend` (answer -> meaning), which the prompt states before the question.
    """
    from PIL import Image

    spec = flag_spec(flag)
    if numbered:
        spec = numbered_spec(spec)
    if legend not in LEGEND_MODES:
        raise DatasetError(f"--legend {legend!r}: expected one of {list(LEGEND_MODES)}")
    if size not in SIZES:
        raise DatasetError(f"--size {size}: MedMNIST 2D images come in sizes {list(SIZES)}")
    if max_corpus is not None and max_corpus < 1:
        raise DatasetError(f"--max-corpus {max_corpus}: must be at least 1")
    npz = Path(npz) if npz is not None else download_npz(flag, size)
    splits = read_npz(npz, spec, size)
    rng = np.random.default_rng(seed)
    n_train = len(splits["train"][1])
    corpus_index = np.arange(n_train)
    if max_corpus is not None and max_corpus < n_train:
        corpus_index = np.sort(rng.choice(n_train, size=max_corpus, replace=False))
    question = question_text(spec)
    use_legend = legend == "on" or legend == "auto" and spec.numbered

    def metadata(split: str, index: int, row) -> dict:
        if spec.multilabel:
            ks = np.flatnonzero(row).tolist()
            return {"source_split": split, "source_index": index, "class_indices": ks,
                    "class_names": [spec.class_names[k] for k in ks]}
        return {"source_split": split, "source_index": index, "class_index": int(row),
                "class_name": spec.class_names[int(row)]}

    def answer(row) -> dict:
        if spec.multilabel:
            return {"label": "", "label_set": tuple(spec.answers[k] for k in np.flatnonzero(row))}
        return {"label": spec.answers[int(row)]}

    with DatasetWriter(out, overwrite=overwrite) as w:
        image_of: dict[tuple[str, int], str] = {}
        for split in SPLITS:
            images, labels = splits[split]
            for i in tqdm(range(len(labels)), desc=f"{flag} {split} images", unit="img", leave=False):
                pixels = Image.fromarray(images[i]).convert("RGB")
                image_of[split, i] = w.add_image(f"{split}-{i:06d}", pixels)
                w.queries[split].append(Query(
                    id=f"q-{split}-{i:06d}", image=image_of[split, i], question=question,
                    candidates=spec.answers, metadata=metadata(split, i, labels[i]), **answer(labels[i])))
        train_labels = splits["train"][1]
        train_queries = w.queries["train"]
        for i in corpus_index.tolist():
            w.corpus.append(CorpusItem(
                id=f"c-train-{i:06d}", image=image_of["train", i], text=report_text(spec, train_labels[i], rng),
                label=train_queries[i].label, metadata=metadata("train", i, train_labels[i])))
        w.meta = DatasetMeta(
            name=flag if size == 28 else f"{flag}_{size}",
            task="multilabel" if spec.multilabel else "classification",
            labels=list(spec.answers),
            allow_empty=spec.multilabel,
            legend=spec.legend() if use_legend else {},
            source=f"{spec.title} from {MEDMNIST_CITATION}",
            license=spec.license,
            description=f"MedMNIST {spec.title} ({size}x{size}) converted by dxrag: corpus = train split with "
                        f"templated report texts derived from the label; queries = train, val and test images.",
            extra={
                "converter": "dxrag.core.data.medmnist",
                "flag": flag,
                "size": size,
                "npz": str(npz),
                "npz_sha256": sha256_file(npz),
                "seed": seed,
                "max_corpus": max_corpus,
                "question": question,
                "class_names": list(spec.class_names),
                "answers": list(spec.answers),
                "numbered": numbered,
                "same_image": "A train query and a corpus item show the same image when their metadata "
                              "(source_split, source_index) match; they then also share the same 'image' file. "
                              "Exclude such items from the query's retrieved list (a query must not retrieve "
                              "itself).",
                "same_image_keys": ["source_split", "source_index"],
            },
        )
    log.info("wrote %s (%d corpus items; queries train/val/test %s) to %s", flag, len(corpus_index),
             "/".join(str(len(splits[s][1])) for s in SPLITS), out)
    return Path(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dxrag data medmnist`."""
    parser.add_argument("--flag", required=True,
                        help=f"2D MedMNIST flag: {', '.join([*FLAGS, *MULTI_LABEL_FLAGS])} (chestmnist: multi-label)")
    parser.add_argument("--npz", type=Path, default=None,
                        help="local <flag>.npz (keys {train,val,test}_{images,labels}); without it the medmnist "
                             "package downloads the flag (needs network access)")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--size", type=int, default=28, choices=SIZES, help="image side of the npz (default 28)")
    parser.add_argument("--max-corpus", type=int, default=None,
                        help="keep a seeded random subset of this many train images in the corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed for report phrasings and the corpus subset")
    parser.add_argument("--numbered", action="store_true",
                        help="answer with class indices 0..n-1 instead of class names (the reference's DermaMNIST "
                             "prompt); the legend then names the classes")
    parser.add_argument("--legend", choices=LEGEND_MODES, default="auto",
                        help="write dataset.yaml `legend` (answer -> meaning) that the prompt states: auto = when "
                             "the answers are numbers (retinamnist, --numbered), on, off (default auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run(args: argparse.Namespace) -> int:
    """Run `dxrag data medmnist`; DatasetError propagates to the caller with its message."""
    out = convert_medmnist(args.flag, args.out, npz=args.npz, size=args.size, overwrite=args.overwrite,
                           max_corpus=args.max_corpus, seed=args.seed, numbered=args.numbered,
                           legend=args.legend)
    print(f"wrote {out}")
    return 0
