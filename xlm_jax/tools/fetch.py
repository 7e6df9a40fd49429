"""Download the public corpora the configs read, laid out as in ../shared/data (for a fresh
machine such as Colab). Training never downloads anything; this is a separate, explicit step.

  python -m xlm_jax.fetch --to=../shared/data multi30k xnli

Each file comes from the public repository (at a fixed commit) that ../shared/data/README.md names
for it, and must have the SHA-256 of the copy the numbers in docs/results.md were measured on;
a file already present with the right content is not fetched again. Multi30k: ``train``, ``val``
and ``test_2016_flickr`` in en/de/fr (raw text, decompressed); XNLI: the dev set of the 15
languages (``premise<TAB>hypothesis<TAB>label``, XTREME's format). Licences: that README.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from xlm_jax.core.files import write_atomic
from xlm_jax.data.presets import MULTI30K, XNLI15

BASE_URLS = {
    "multi30k": "https://raw.githubusercontent.com/multi30k/dataset/"
    "a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw",
    "xnli": "https://raw.githubusercontent.com/GautamGupta17/MESH/"
    "8325b2bc0c537c553864742ce6aec6b6fded2964/data/xnli",
}

SHA256 = {
    "multi30k/train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "multi30k/train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "multi30k/train.fr": "5925a3c18f1587b6b54b87743106e6e8ab93618edb6f65d19eac0621f853a10d",
    "multi30k/val.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "multi30k/val.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    "multi30k/val.fr": "5304e444d842e962b2dda4d816b70b22a1765b15401642b7ca37a67477e708dc",
    "multi30k/test_2016_flickr.en": (
        "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182"
    ),
    "multi30k/test_2016_flickr.de": (
        "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16"
    ),
    "multi30k/test_2016_flickr.fr": (
        "cb3160d69b002bb638e66cc7612fcd56cb0af82eadc9c142dedc438afb885ef6"
    ),
    "xnli/ar.tsv": "472ad1b14b8882b982171ecb875b811b4bcec90f03b5c31f634bc85b65295b63",
    "xnli/bg.tsv": "31dab92812b1dc8fad6ea798acb0e6d79b24d00b706f54e60a90617fb2444b27",
    "xnli/de.tsv": "5a5ad525225418a96a82c595a83a93e2e3a852af01e92de92f925a61f82d8cbd",
    "xnli/el.tsv": "c1892ec69752a9b335bd2b4287708ee7745521f7c8e88672e458ee30f3b4b57e",
    "xnli/en.tsv": "d3899b7562dbba9418124a9a5fcd01bb78816bf724e8f301af15c6845a338c88",
    "xnli/es.tsv": "0fd4fe222b7e5128eec8a0c6953325673c9cf29f8fe22c77905332323d65f06c",
    "xnli/fr.tsv": "ef9f5b2a508f6d56ea4181e630d7a0174753435ec428c6b3e9f05abeee6ef550",
    "xnli/hi.tsv": "2a7a1a7083c518bbad61d7c5b9a369645ba73f3b97996ac38c210e831d741b02",
    "xnli/ru.tsv": "5bd27b99f24f9c5e87d7428e3bcc14f765b89166a23686f36b6ae9735450eaf3",
    "xnli/sw.tsv": "58f277e88898ff8ef9e0bf1b1518ed80d466b8797b042ea50dccebdbc2561b60",
    "xnli/th.tsv": "032ecbb4efeecd5d0ce3f06e96ecd73bfda51c0cccbe032b6f184699c2ff49bb",
    "xnli/tr.tsv": "1c6d71da6947a02b060f94d52d1886b189a429a536a20a44004161b6c9f066a7",
    "xnli/ur.tsv": "b9104420019f38fe2a73029dfa789002fc0e2250557e5b3e1d711000f2177228",
    "xnli/vi.tsv": "566a16e1fcdebd2fa1a97563c3b1a8e86d21b3fd5863742b2b287bb000fa9198",
    "xnli/zh.tsv": "1fc62e08fea927012d639006e3efc893e17cae2439776d9f51fcd9c41dc383e6",
}


def files(name: str) -> dict[str, str]:
    """{path under the data root: file name at the source} of corpus ``name``."""
    if name == "multi30k":
        return {
            f"multi30k/{split}.{lang}": f"{split}.{lang}.gz"
            for split in ("train", "val", "test_2016_flickr")
            for lang in MULTI30K
        }
    if name == "xnli":
        return {f"xnli/{lang}.tsv": f"dev-{lang}.tsv" for lang in XNLI15}
    raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(BASE_URLS)}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def missing(root: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """The files of corpora ``names`` that are absent under ``root`` or differ from the
    reference copy."""
    root = Path(root)
    out = []
    for name in names:
        for path in files(name):
            file = root / path
            if not file.is_file() or _sha256(file.read_bytes()) != SHA256[path]:
                out.append(path)
    return out


def fetch(
    root: str | os.PathLike,
    names: Sequence[str],
    *,
    base_urls: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> list[Path]:
    """Downloads the missing files of corpora ``names`` into ``root`` (decompressing ``.gz``),
    checks each against its SHA-256 before writing it (atomically); returns the files written.
    ``base_urls`` replaces ``BASE_URLS`` (a mirror, or ``file://`` for a local copy)."""
    root = Path(root)
    bases = {**BASE_URLS, **(base_urls or {})}
    written = []
    todo = set(missing(root, names))
    for name in names:
        for path, remote in files(name).items():
            if path not in todo:
                continue
            url = f"{bases[name].rstrip('/')}/{remote}"
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
            if remote.endswith(".gz"):
                data = gzip.decompress(data)
            if _sha256(data) != SHA256[path]:
                raise ValueError(
                    f"{url}: SHA-256 {_sha256(data)} is not the expected {SHA256[path]} "
                    f"(not the {path} the project's results were measured on)"
                )
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, data)
            written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xlm_jax.fetch", description=__doc__)
    parser.add_argument("corpora", nargs="+", choices=sorted(BASE_URLS))
    parser.add_argument("--to", required=True, help="the data root (e.g. ../shared/data)")
    args = parser.parse_args(argv)
    for path in fetch(args.to, args.corpora):
        print(f"wrote {path}")
    left = missing(args.to, args.corpora)
    print("all files present and verified" if not left else f"still missing: {left}")


if __name__ == "__main__":
    main()
