"""The embedded default dataset: synthetic retinal-style exams graded 0–4, with a corpus of prior exam records.

Deterministic by seed, numpy + PIL only, a few seconds for the default size.

The generative story (it is what makes retrieval matter):
- A population of *patients*, each with an anatomy (a point in a low-dimensional space of smooth colour fields) and a
  disease grade. Grades are assigned to patients at random, so no smooth function of the anatomy predicts the grade:
  a classifier trained on images alone has to memorise patients, while a nearest-neighbour search over prior exams
  finds the same patient and reads the grade from the record.
- Each exam image = the patient's anatomy (jittered) + lesion spots whose count grows with the exam's grade (weak,
  overlapping cues: Poisson counts, low contrast) + pixel noise. Adjacent grades overlap by construction.
- The corpus holds prior exams ("hospital records"): image + report text naming the findings and the grade. A fraction
  is *misleading* (the prior exam was one grade away: disease progressed or regressed since) and a fraction
  *mislabeled* (the report states a wrong grade). Queries are new exams of the same patients.

Knobs that move the two retrieval-matters properties (see tests/data/test_synth.py for the reference methods):
- `anatomy_jitter` up / `anatomy_dims` down → patients blur together → more inconsistent top-k, weaker kNN.
- `lesion_contrast` up / `lesion_rate` slope up → images alone become informative → the classifier catches up.
- `misleading_fraction`, `mislabeled_fraction` up → more top-k disagreement, lower kNN accuracy.
- `n_patients` up at fixed corpus size → fewer prior exams per patient → weaker retrieval.

Latent per-exam difficulty (acquisition quality / lesion visibility), d ~ Beta(`difficulty_a`, `difficulty_b`),
recorded as `metadata.difficulty` of every query and corpus item. Each effect scales with d; the defaults were
calibrated against BreastMNIST and PneumoniaMNIST runs (docs/calibration.md). Setting every effect and `lesion_haze`
to 0 reproduces the images of the generator without difficulty (d has its own random stream):
- `jitter_gain` → anatomy jitter × (1 + jitter_gain·d): the exam looks less like the patient's other exams → wrong
  patients retrieved, more top-k disagreement.
- `noise_gain` → pixel noise × (1 + noise_gain·d): both retrieval and lesion reading degrade.
- `blur` → Gaussian blur of sigma blur·d pixels: small lesion spots smear out.
- `lesion_fade` → lesion contrast and haze × (1 − lesion_fade·d): fainter lesions → closed-book errors on hard exams.
- `lesion_haze` → a diffuse exudate tint of lesion_haze × grade over the fundus disc (at d = 0): the cue the tiny
  closed-book reader learns (it cannot count faint spots); without it the closed-book reader collapses to 1–3 classes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..base.dataset import DatasetError, DatasetMeta, DatasetWriter
from ..base.records import CorpusItem, Query

log = logging.getLogger(__name__)

GRADES = ("none", "mild", "moderate", "severe", "proliferative")
QUESTION = "What is the severity of diabetic retinopathy?"
_FINDINGS = {
    0: "no microaneurysms or haemorrhages",
    1: "a few microaneurysms",
    2: "microaneurysms and dot haemorrhages",
    3: "many haemorrhages and venous beading",
    4: "haemorrhages with neovascularisation",
}
_PHRASES = (
    "Prior fundus exam of patient {pid}. Findings: {findings}; {spots} lesion spots counted. Impression: {grade} "
    "diabetic retinopathy.",
    "Fundus photograph, patient {pid}. {findings_cap} were noted ({spots} spots). Graded as {grade}.",
    "Retinal screening report for patient {pid}: {findings}, about {spots} spots. Diagnosis: {grade} retinopathy.",
)


@dataclass
class SynthConfig:
    """The generator's knobs (the seed is `generate`'s argument). YAML fills it as `data.synth`."""

    size: int = 32  # image side in pixels (32..64)
    n_patients: int = 200
    n_corpus: int = 2000
    n_train: int = 1000
    n_val: int = 200
    n_test: int = 500
    anatomy_dims: int = 10
    anatomy_jitter: float = 0.3  # per-exam jitter of the anatomy coefficients (units: anatomy std), at difficulty 0
    lesion_base: float = 0.5  # Poisson mean of lesion spots = lesion_base + lesion_slope * grade
    lesion_slope: float = 1.1
    lesion_contrast: float = 0.18  # at difficulty 0
    lesion_haze: float = 0.08  # diffuse exudate tint per grade step (lesion load as a colour shift), at difficulty 0
    pixel_noise: float = 0.04  # at difficulty 0
    misleading_fraction: float = 0.03  # prior exams one grade away from the patient's grade (text and image agree)
    mislabeled_fraction: float = 0.02  # reports stating a wrong grade (the image shows the true one)
    # Latent per-exam difficulty d ~ Beta(difficulty_a, difficulty_b), and what d = 1 does to the exam:
    difficulty_a: float = 1.0
    difficulty_b: float = 1.0
    lesion_fade: float = 1.0  # lesion contrast x (1 - lesion_fade * d)
    noise_gain: float = 1.0  # pixel noise x (1 + noise_gain * d)
    blur: float = 0.0  # Gaussian blur of sigma blur * d pixels
    jitter_gain: float = 0.5  # anatomy jitter x (1 + jitter_gain * d)

    def __post_init__(self) -> None:
        if not 32 <= self.size <= 64:
            raise DatasetError(f"size must be within 32..64 pixels, got {self.size}")
        for name in ("misleading_fraction", "mislabeled_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise DatasetError(f"{name} must be in [0, 1), got {v}")
        if not 0.0 <= self.lesion_fade <= 1.0:
            raise DatasetError(f"lesion_fade must be in [0, 1], got {self.lesion_fade}")
        for name in ("difficulty_a", "difficulty_b"):
            if getattr(self, name) <= 0:
                raise DatasetError(f"{name} must be positive (Beta distribution parameter), got {getattr(self, name)}")
        for name in ("noise_gain", "blur", "jitter_gain", "anatomy_jitter", "pixel_noise", "lesion_contrast",
                     "lesion_haze", "lesion_base", "lesion_slope"):
            if getattr(self, name) < 0:
                raise DatasetError(f"{name} must be >= 0, got {getattr(self, name)}")
        if min(self.n_patients, self.n_corpus, self.n_train, self.n_val, self.n_test) < 1:
            raise DatasetError("all counts must be positive")


_EXUDATE = np.array([0.9, 0.85, 0.3], dtype=np.float32)  # the bright lesions' yellow


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) row-normalised Gaussian smoothing matrix: blurred = M @ img @ M.T per channel."""
    x = np.arange(size, dtype=np.float32)
    m = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * sigma**2))
    return (m / m.sum(1, keepdims=True)).astype(np.float32)


class _Renderer:
    """Turns (anatomy coefficients, lesion spots, difficulty) into an RGB image."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator):
        self.cfg = cfg
        s = cfg.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        # A fixed basis of smooth colour fields: low-frequency plane waves with random orientation, phase and colour.
        basis = []
        for _ in range(cfg.anatomy_dims):
            fx, fy = rng.uniform(-2.5, 2.5, size=2)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
            colour = rng.normal(size=3)
            basis.append(wave[..., None] * colour[None, None, :])
        self.basis = np.stack(basis).astype(np.float32)  # (D, s, s, 3)
        self.basis /= np.sqrt(cfg.anatomy_dims) * 2.0
        # Fundus-like base: orange disc with darker rim.
        r = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
        disc = np.clip(1.2 - 1.6 * r, 0, 1)[..., None]
        self.base = (disc * np.array([0.75, 0.38, 0.18], dtype=np.float32)).astype(np.float32)
        self.disc = disc.astype(np.float32)
        self.yy, self.xx = yy, xx

    def render(self, anatomy: np.ndarray, n_spots: int, difficulty: float, rng: np.random.Generator,
               grade: int = 0) -> np.ndarray:
        cfg = self.cfg
        img = self.base + np.tensordot(anatomy.astype(np.float32), self.basis, axes=1) * 0.5
        visibility = 1.0 - cfg.lesion_fade * difficulty
        contrast = cfg.lesion_contrast * visibility
        if cfg.lesion_haze > 0:
            img = img + (cfg.lesion_haze * visibility * grade) * self.disc * _EXUDATE
        for _ in range(n_spots):
            cx, cy = rng.uniform(0.2, 0.8, size=2)
            rad = rng.uniform(0.025, 0.05)
            blob = np.exp(-(((self.xx - cx) ** 2 + (self.yy - cy) ** 2) / (2 * rad**2)))
            tint = _EXUDATE if rng.random() < 0.5 else np.array([-0.6, -0.5, -0.3])
            img = img + contrast * blob[..., None] * tint[None, None, :].astype(np.float32)
        sigma = cfg.blur * difficulty
        if sigma > 0.05:  # below that the kernel is the identity to float precision
            m = _blur_matrix(cfg.size, sigma)
            img = np.einsum("ij,jkc,lk->ilc", m, img, m)
        noise = cfg.pixel_noise * (1.0 + cfg.noise_gain * difficulty)
        img = img + rng.normal(scale=noise, size=img.shape).astype(np.float32)
        return (np.clip(img + 0.1, 0.0, 1.0) * 255).round().astype(np.uint8)


def _report(rng: np.random.Generator, pid: str, grade: int, n_spots: int) -> str:
    findings = _FINDINGS[grade]
    template = _PHRASES[int(rng.integers(len(_PHRASES)))]
    return template.format(pid=pid, findings=findings, findings_cap=findings[0].upper() + findings[1:],
                           spots=n_spots, grade=GRADES[grade])


def _options_question() -> str:
    return f"{QUESTION} Options: {', '.join(GRADES)}."


def generate(out: str | Path, seed: int = 0, overwrite: bool = False, **knobs) -> Path:
    """Write the synthetic dataset directory to `out` (atomically) and return its path.

    `knobs` override fields of `SynthConfig` (sizes, jitter, lesion strength, misleading/mislabeled fractions,
    difficulty).
    """
    from PIL import Image

    cfg = SynthConfig(**knobs)
    rng = np.random.default_rng(seed)
    # Difficulty has its own stream: with every difficulty effect at 0 the images are those of the generator before
    # difficulty existed (same draws from `rng`), whatever the Beta parameters.
    difficulty_rng = np.random.default_rng([seed, 1])
    renderer = _Renderer(cfg, rng)
    n_grades = len(GRADES)
    patient_anatomy = rng.normal(size=(cfg.n_patients, cfg.anatomy_dims)).astype(np.float32)
    patient_grade = np.arange(cfg.n_patients) % n_grades  # balanced grades, order shuffled below
    rng.shuffle(patient_grade)
    pids = [f"P{i:04d}" for i in range(cfg.n_patients)]

    def exam(patient: int, grade: int) -> tuple[np.ndarray, int, float]:
        d = float(difficulty_rng.beta(cfg.difficulty_a, cfg.difficulty_b))
        jitter = cfg.anatomy_jitter * (1.0 + cfg.jitter_gain * d)
        anatomy = patient_anatomy[patient] + rng.normal(scale=jitter, size=cfg.anatomy_dims)
        n_spots = int(rng.poisson(cfg.lesion_base + cfg.lesion_slope * grade))
        return renderer.render(anatomy, n_spots, d, rng, grade), n_spots, d

    with DatasetWriter(out, overwrite=overwrite) as w:
        corpus_patients = np.concatenate([np.arange(cfg.n_patients),
                                          rng.integers(cfg.n_patients, size=max(0, cfg.n_corpus - cfg.n_patients))])
        corpus_patients = corpus_patients[: cfg.n_corpus]
        rng.shuffle(corpus_patients)
        for i, p in enumerate(corpus_patients):
            true_grade = int(patient_grade[p])
            kind = "faithful"
            exam_grade = true_grade
            if rng.random() < cfg.misleading_fraction:
                step = int(rng.choice([-1, 1]))
                exam_grade = min(max(true_grade + step, 0), n_grades - 1)
                if exam_grade == true_grade:
                    exam_grade = true_grade - step
                kind = "misleading"
            stated = exam_grade
            if rng.random() < cfg.mislabeled_fraction:
                stated = int(rng.choice([g for g in range(n_grades) if g != exam_grade]))
                kind = "mislabeled"
            pixels, n_spots, d = exam(int(p), exam_grade)
            cid = f"c{i:06d}"
            rel = w.add_image(cid, Image.fromarray(pixels))
            w.corpus.append(CorpusItem(
                id=cid, image=rel, text=_report(rng, pids[p], stated, n_spots), label=GRADES[stated],
                metadata={"patient": pids[p], "exam_grade": GRADES[exam_grade], "kind": kind,
                          "difficulty": round(d, 4)},
            ))
        question = _options_question()
        qi = 0
        for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
            for p in rng.integers(cfg.n_patients, size=n):
                grade = int(patient_grade[p])
                pixels, n_spots, d = exam(int(p), grade)
                qid = f"q{qi:06d}"
                qi += 1
                rel = w.add_image(qid, Image.fromarray(pixels))
                w.queries[split].append(Query(
                    id=qid, image=rel, question=question, candidates=GRADES, label=GRADES[grade],
                    metadata={"patient": pids[p], "lesion_spots": n_spots, "difficulty": round(d, 4)},
                ))
        w.meta = DatasetMeta(
            name="dxrag-synth-dr",
            task="classification",
            labels=list(GRADES),
            source=f"generated by dxrag.core.data.synth (seed {seed})",
            license="CC0-1.0 (synthetic, generated by dxrag)",
            description="Synthetic 5-grade retinopathy-style exams; corpus = prior exams of the same patients with "
                        "report text (some misleading or mislabeled); queries = new exams.",
            extra={"generator": "dxrag.core.data.synth", "seed": seed, "config": asdict(cfg)},
        )
    log.info("wrote synthetic dataset to %s", out)
    return Path(out)

