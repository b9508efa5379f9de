"""The data sets downloaded from their publishers' servers: where each file lives and on what terms.

`delrec data fetch NAME` (delrec.data.acquisition.fetch) downloads the files listed here into
`<cache>/datasets/NAME/`; delrec.data.formats reads them in their native formats. The choice of
each source and version, and the statistics each should give beside the paper's, are in
docs/datasets.md.

Every source's base URL can be replaced, for a mirror or for tests: `base_url=` (the CLI's
`--base-url`), or `$DELREC_DATA_MIRROR`, under which the files of data set NAME are looked up at
`$DELREC_DATA_MIRROR/NAME/<path>` (the path the file has below the publisher's base URL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath

MIRROR_ENV = "DELREC_DATA_MIRROR"


@dataclass(frozen=True)
class RemoteFile:
    path: str  # below the source's base URL, e.g. "categoryFilesSmall/All_Beauty.csv"
    md5: str | None = None  # the publisher's checksum, where it publishes one (Zenodo does)
    description: str = ""

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class RemoteSource:
    """One data set as its publisher serves it. `format` names the reader in delrec.data.formats."""

    name: str
    title: str
    base_url: str
    files: tuple[RemoteFile, ...]
    format: str
    version: str
    homepage: str
    license: str
    refusal: str | None = None  # set: this name is known, but fetching it is refused (the reason)

    def url(self, file: RemoteFile, base_url: str | None = None) -> str:
        """Where `file` is downloaded from: `base_url`, else $DELREC_DATA_MIRROR/NAME, else the publisher."""
        if base_url is None and os.environ.get(MIRROR_ENV):
            base_url = os.environ[MIRROR_ENV].rstrip("/") + "/" + self.name
        return (base_url or self.base_url).rstrip("/") + "/" + file.path

    @property
    def file_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files)


_AMAZON_2018 = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_v2"
_AMAZON_HOME = "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon_v2/"
_AMAZON_TERMS = (
    "Amazon Review Data (2018), J. Ni, J. Li, J. McAuley, 'Justifying recommendations using distantly-labeled "
    "reviews and fine-grained aspects', EMNLP 2019. Published by the McAuley lab (UCSD) for research use, with no "
    "licence to redistribute it: the data stays in a per-user cache, never in the repository."
)
_STEAM_TERMS = (
    "Steam review and game data, W.-C. Kang and J. McAuley, 'Self-attentive sequential recommendation', ICDM 2018 "
    "(also M. Wan and J. McAuley, RecSys 2018; A. Pathak, K. Gupta, J. McAuley, SIGIR 2017). Published by the "
    "McAuley lab (UCSD) for research use, with no licence to redistribute it: the data stays in a per-user cache."
)
_KUAIREC_TERMS = (
    "KuaiRec 2.0, C. Gao et al., 'KuaiRec: A Fully-observed Dataset and Insights for Evaluating Recommender "
    "Systems', CIKM 2022; licence CC BY-SA 4.0 (attribution, share-alike). delrec does not redistribute it either: "
    "it is downloaded from Zenodo into a per-user cache."
)


def _amazon(name: str, category: str, what: str) -> RemoteSource:
    return RemoteSource(
        name=name,
        title=f"Amazon Review Data (2018), {category} ({what})",
        base_url=_AMAZON_2018,
        files=(
            RemoteFile(f"categoryFilesSmall/{category}.csv", description="ratings only: item,user,rating,timestamp"),
            RemoteFile(f"metaFiles2/meta_{category}.json.gz", description="product metadata (asin, title, ...)"),
        ),
        format="amazon-2018",
        version=f"Amazon Review Data 2018 (Ni et al. 2019), {category}: ratings-only CSV and metadata",
        homepage=_AMAZON_HOME,
        license=_AMAZON_TERMS,
    )


REMOTE: dict[str, RemoteSource] = {
    "steam": RemoteSource(
        name="steam",
        title="Steam reviews and games (Kang & McAuley 2018)",
        base_url="https://mcauleylab.ucsd.edu/public_datasets/data/steam",
        files=(
            RemoteFile("steam_reviews.json.gz", description="7.8M reviews, Python-literal lines (username, product_id, date)"),
            RemoteFile("steam_games.json.gz", description="game metadata, Python-literal lines (id, title, app_name)"),
        ),
        format="steam",
        version="Steam data version 2 (reviews + game metadata) of Kang & McAuley, ICDM 2018 (SASRec)",
        homepage="https://cseweb.ucsd.edu/~jmcauley/datasets.html#steam_data",
        license=_STEAM_TERMS,
    ),
    "beauty": _amazon("beauty", "All_Beauty", "Table I's Beauty"),
    "home-kitchen": _amazon("home-kitchen", "Home_and_Kitchen", "Table I's Home & Kitchen"),
    "kuairec": RemoteSource(
        name="kuairec",
        title="KuaiRec 2.0 (Gao et al. 2022), big matrix with captions",
        base_url="https://zenodo.org/records/18164998/files",
        files=(
            # md5: Zenodo's, listed on the record page (the record is immutable: a new release gets a new record)
            RemoteFile("KuaiRec.zip", md5="261550d472c48eff4990fb13c0e5bcf7",
                       description="KuaiRec 2.0/data/big_matrix.csv (and the other tables)"),
            RemoteFile("kuairec_caption_category.csv", md5="31bc38cdccdf75a71df137779035f8cb",
                       description="video_id, manual_cover_text, caption, topic_tag, categories"),
        ),
        format="kuairec",
        version="KuaiRec 2.0 (2022-05-16 release, captions of 2024-06-02), Zenodo record 18164998",
        homepage="https://kuairec.com",
        license=_KUAIREC_TERMS,
    ),
    "steam-llara": RemoteSource(
        name="steam-llara",
        title="Steam as preprocessed by LLaRA (Liao et al. 2024)",
        base_url="https://huggingface.co/datasets/joyliao7777/LLaRA/resolve/main",
        files=(),
        format="refused",
        version="LLaRA's data/ref/steam (train_data.df, Val_data.df, Test_data.df, id2name.txt)",
        homepage="https://github.com/ljy0ustc/LLaRA",
        license="see the LLaRA repository; the underlying data are Kang & McAuley's Steam data",
        refusal=(
            "steam-llara is not fetched: LLaRA publishes its Steam split (the 11,938 users / 3,581 items / 274,726 "
            "interactions of the paper's Table I) only as pandas pickles (train_data.df, Val_data.df, Test_data.df). "
            "Reading a pickle runs whatever code it names, so a downloaded pickle is never unpickled here, and LLaRA "
            "publishes no other form of those interactions (its id2name.txt holds titles only), nor the code that "
            "sampled them. Use `steam` instead: the original Steam review data of Kang & McAuley (ICDM 2018), in its "
            "non-pickle form (docs/datasets.md compares the two)."
        ),
    ),
}
