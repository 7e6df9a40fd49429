"""TF-free TFDS builders over the project's local corpora.

They read plain text files from `manual_dir` (never download), write array_record (readable by
random access with `builder.as_data_source`, no TensorFlow), and keep file order (int keys +
`disable_shuffling`) so line ranges and cross-language alignment survive. Prepare with
`xlm_jax.data.sources.prepare_local`, read with `read_lines('tfds:NAME:SPLIT:FIELD')`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tensorflow_datasets as tfds

from xlm_jax.data.text_files import read_aligned_files

# ISO 639-1 (project codes) -> ISO 639-3 (Tatoeba file names), for English and the 14 other
# XNLI languages.
ISO3 = MappingProxyType(
    {
        "en": "eng",
        "fr": "fra",
        "es": "spa",
        "de": "deu",
        "el": "ell",
        "bg": "bul",
        "ru": "rus",
        "tr": "tur",
        "ar": "ara",
        "vi": "vie",
        "th": "tha",
        "zh": "cmn",
        "hi": "hin",
        "sw": "swh",
        "ur": "urd",
    }
)
XNLI_LANGS = ("fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur")
MULTI30K_LANGS = ("en", "de", "fr", "cs")
# TFDS split -> file stem in the Multi30k task-1 raw layout.
MULTI30K_SPLITS = MappingProxyType(
    {
        "train": "train",
        "validation": "val",
        "test": "test_2016_flickr",
    }
)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: array_record by default, file order kept, aligned text columns."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, file_format: str | None = None, **kwargs: Any) -> None:
        # tfds 4.9.10 has no class-level default format (it falls back to tfrecord, which
        # needs TensorFlow to read), so default it here; an explicit choice still wins.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _text_info(self, langs: tuple[str, ...], description: str) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=description,
            features=tfds.features.FeaturesDict({lg: tfds.features.Text() for lg in langs}),
            supervised_keys=None,
            disable_shuffling=True,  # keep line order: ranges like @0:14500 refer to it
        )

    def source_files(self, manual_dir: str | os.PathLike) -> dict[str, dict[str, Path]]:
        """{split: {feature: text file}}: what preparing reads (checked before preparing)."""
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        files = self.source_files(dl_manager.manual_dir)
        return {split: self._generate_examples(cols) for split, cols in files.items()}

    def _generate_examples(self, files: dict[str, Path]) -> Iterator[tuple[int, dict[str, str]]]:
        # read_aligned_files validates UTF-8, line lengths and equal line counts (DataError).
        columns = read_aligned_files(list(files.values()))
        for i, row in enumerate(zip(*columns, strict=True)):
            yield i, dict(zip(files, row, strict=True))


class Multi30kLocal(_LocalBuilder):
    """Multi30k task 1 (raw text), line-aligned en/de/fr/cs."""

    name = "multi30k_local"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the Multi30k task-1 raw text files (decompressed) in manual_dir: "
        + ", ".join(f"{stem}.{{{','.join(MULTI30K_LANGS)}}}" for stem in MULTI30K_SPLITS.values())
        + " (github.com/multi30k/dataset, data/task1/raw)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self._text_info(MULTI30K_LANGS, "Multi30k task 1, raw text, en/de/fr/cs.")

    def source_files(self, manual_dir: str | os.PathLike) -> dict[str, dict[str, Path]]:
        manual = Path(manual_dir)
        return {
            split: {lg: manual / f"{stem}.{lg}" for lg in MULTI30K_LANGS}
            for split, stem in MULTI30K_SPLITS.items()
        }


class TatoebaLocal(_LocalBuilder):
    """Tatoeba test pairs (LASER's copy), one config per XNLI language paired with English."""

    name = "tatoeba_local"
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=f"{lg}-en", description=f"Tatoeba {lg}-en sentence pairs.")
        for lg in XNLI_LANGS
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the LASER Tatoeba files tatoeba.{iso3}-eng.{iso3} and tatoeba.{iso3}-eng.eng in "
        "manual_dir (github.com/facebookresearch/LASER, data/tatoeba/v1), with iso3 one of "
        + " ".join(ISO3[lg] for lg in XNLI_LANGS)
        + "."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        lg = self.builder_config.name.split("-")[0]
        return self._text_info((lg, "en"), f"Tatoeba {lg}-en sentence pairs.")

    def source_files(self, manual_dir: str | os.PathLike) -> dict[str, dict[str, Path]]:
        lg = self.builder_config.name.split("-")[0]
        stem = Path(manual_dir) / f"tatoeba.{ISO3[lg]}-eng"
        return {"test": {lg: Path(f"{stem}.{ISO3[lg]}"), "en": Path(f"{stem}.eng")}}


# The builders sources.prepare_local may prepare (everything else would download).
LOCAL_BUILDERS = MappingProxyType({b.name: b for b in (Multi30kLocal, TatoebaLocal)})
