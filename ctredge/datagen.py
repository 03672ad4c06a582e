"""Synthetic e-commerce click logs drawn from a planted ground-truth model.

``ctredge datagen --rows N --seed S --out FILE.tsv [--history]`` writes

* ``FILE.tsv``: ``label \\t dense_1..dense_7 \\t cat_1..cat_11 [\\t history]``,
  the layout :mod:`ctredge.reader` reads (empty field = missing);
* ``FILE.spec.json``: the matching :class:`~ctredge.features.FeatureSpec`;
* ``FILE.truth.json``: row count, observed click rate, and the Bayes ceiling
  (AUC and logloss of the *true* click probabilities) on every row (``bayes_auc``)
  and, under ``scopes``, on all rows and on the default **test part** (the rows
  :class:`ctredge.dataplan.DataPlan` holds out for testing when ``ctredge
  train`` splits this one file with ``split_seed`` and 0.1/0.1: exactly the
  rows the models are scored on); with ``ceiling=True`` (``--ceiling``) also a
  *learnable* ceiling: a logistic regression on one-hot keys of the planted
  effects (:data:`CEILING_KEYS`), fit on the default train part (its L2 chosen
  on the valid part) and scored on the test part (scikit-learn; recorded as
  skipped when it is not installed).

Seeds: ``seed`` draws the world (users, items, effects, the bias) and, by
default, the sample of impressions; ``sample_seed`` draws another sample of
the same world (``sample_seed == seed`` is the default and writes the same
bytes as before the option existed), e.g. a large held-out file for
``ctredge compress all --eval-data``.  Two files of one world with the same
sample seed share their first rows (a prefix), so a held-out file needs
another sample seed.

The world (drawn from the seed): users with Zipf-like activity, a segment, a
region, a main device and 4 favourite categories (weights sum to 1) drawn from
their segment's taste; items with Zipf-like popularity, a category, brand, shop,
price, rating and review count.  An impression picks a user, a device, an hour,
a page (search / feed / detail), maybe a session intent (a category: always on
search, where it is the query; half the time elsewhere), a behaviour history
(items from the user's favourite categories, the most recent ones from the
intent), a candidate item (from the intent, the user's tastes or the global
popularity; sometimes re-targeted from the history) and a position.  Its
click log-odds are a sum of terms (:func:`generate_arrays` returns each one):

=============  ============================================================
``item``       item quality + category + brand + shop effects
``user``       user propensity (tied to their order count) + segment + region
``context``    device + hour + page effects, position bias ``-a*log(pos)``,
               a "sale" badge when discounted
``seg_x_cat``  segment x category interaction
``dev_x_cat``  device x category interaction
``price_x_seg``  ``-sensitivity[segment] * log(paid price / category median)``
``affinity``   user latent taste . item latent vector (long-term preference)
``intent``     candidate in the session's intent category (the recent history)
``repeat``     candidate already in the user's history
=============  ============================================================

plus a bias found by bisection so the click rate lands near ``click_rate``.
With ``text=True`` (``--text``) two raw-string columns follow every other one:
``title`` (the candidate item's title) and ``query`` (the search query, empty off
search pages), and the log-odds get one more term, ``text``: the *relevance* of
the title to the query (:class:`_TextWorld`).  Each item has a product concept
(one of its category's two), a colour and an audience; its title names them in
*title words*.  A search row's query asks for one concept of the intent category,
maybe a colour and an audience, in *query words*: synonyms that share no word
with the title words ("trainers" / "running shoes", "scarlet" / "crimson").  The
relevance (0 when the concept differs; else 0.7 + 0.3 x the share of the asked
attributes the item has) is in no id column and no word the two strings
share: a sentence encoder can see it, word ids or hashed tokens cannot.  Its
draws come from their own random streams, so the other columns of a ``--text``
file are those of the same file without it, and without ``--text`` nothing
changes; labels and probabilities differ only by the text term.  The truth file
then records ``text``: the term's weight and the Bayes AUC without it.

The history column only shows what the world already holds: with
``history=False`` the rows, labels and true probabilities are the same, only the
column is not written (so the Bayes ceiling is the same; what a model can reach
without the history is lower).

Rows are simulated in fixed blocks of :data:`BLOCK_ROWS`, each with its own
random stream keyed by ``(seed, block)``: output does not depend on
``chunk_rows``, and ``rows=N`` is a prefix of ``rows=M > N`` (labels apart
when ``click_rate`` differs).  Categorical values are 8-hex-digit strings,
a fixed bijection of ``(vocabulary, index)`` (Criteo-like, seed-independent).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ctredge import metrics
from ctredge.errors import ConfigError, DataError
from ctredge.features import CatFeature, DenseFeature, FeatureSpec, HistorySpec, TextFeature, hash_values
from ctredge.reader import sidecar_path

GENERATOR = "ctredge-datagen-v1"
BLOCK_ROWS = 16_384
MAX_HISTORY = 20

N_USERS, N_ITEMS, N_CATEGORIES, N_BRANDS, N_SHOPS = 40_000, 20_000, 300, 2_000, 5_000
N_SEGMENTS, N_REGIONS, N_DEVICES, N_HOURS, N_PAGES = 8, 30, 4, 24, 3
SEARCH, FEED, DETAIL = 0, 1, 2

# (name, side, transform, integer) in column order
DENSE_COLUMNS = (
    ("price", "item", "log1p", False),
    ("discount_pct", "context", "log1p", True),
    ("rating", "item", "identity", False),
    ("reviews", "item", "log1p", True),
    ("user_orders_30d", "user", "log1p", True),
    ("user_age_days", "user", "log1p", True),
    ("position", "context", "log1p", True),
)
# (name, side, vocabulary, vocabulary size, buckets; None = smallest collision-free >= 4x size)
CAT_COLUMNS = (
    ("user_id", "user", "user_id", N_USERS, 120_000),
    ("user_segment", "user", "user_segment", N_SEGMENTS, None),
    ("region", "user", "region", N_REGIONS, None),
    ("device", "context", "device", N_DEVICES, None),
    ("hour", "context", "hour", N_HOURS, None),
    ("page_type", "context", "page_type", N_PAGES, None),
    ("query_cat", "context", "category", N_CATEGORIES, 1_200),  # shares the category vocabulary
    ("item_id", "item", "item_id", N_ITEMS, 60_000),
    ("category", "item", "category", N_CATEGORIES, 1_200),
    ("brand", "item", "brand", N_BRANDS, 8_000),
    ("shop", "item", "shop", N_SHOPS, 15_000),
)
DISCOUNTS = np.array([5, 10, 15, 20, 30, 40, 50])
PAGE_P = np.array([0.5, 0.35, 0.15])        # search, feed, detail
POS_P = np.array([0.12, 0.07, 0.3])          # geometric position per page
POS_MAX = np.array([50, 100, 12])
CAND_INTENT_P = np.array([0.75, 0.25, 0.6])  # candidate from the intent category
CAND_PREF_P = np.array([0.05, 0.4, 0.15])    # ... from the user's favourite categories


@dataclass(frozen=True)
class WorldParams:
    """Scales of the planted model (standard deviations of log-odds terms unless noted)."""

    item_effect: float = 0.3
    category_effect: float = 0.3
    brand_effect: float = 0.2
    shop_effect: float = 0.15
    user_effect: float = 0.35
    segment_effect: float = 0.2
    region_effect: float = 0.1
    device_effect: float = 0.1
    hour_amplitude: float = 0.15
    page_effects: tuple[float, float, float] = (0.3, -0.2, 0.1)
    position_slope: float = 0.4          # -slope * log(position)
    sale_badge: float = 0.3              # added when discount_pct > 0
    seg_x_cat: float = 0.4
    dev_x_cat: float = 0.3
    price_sensitivity: tuple[float, float] = (0.2, 1.5)   # uniform range per segment
    affinity: float = 1.2                # times user_vec . item_vec (|vec| ~ 1)
    latent_dim: int = 8
    intent_boost: float = 0.8
    repeat_boost: float = 0.6
    retarget_rate: float = 0.06
    text_relevance: float = 2.0          # times the query-title relevance in [0, 1] (search rows, --text)


# --------------------------------------------------------------------- raw values
def _raw_matrix(vocabulary: str, n: int) -> np.ndarray:
    """``uint8 [n, 8]``: the hex digits of ``fmix32((index + salt(vocabulary)) mod 2**32)``."""
    salt = 0x811C9DC5
    for b in vocabulary.encode():
        salt = ((salt ^ b) * 0x01000193) & 0xFFFFFFFF
    with np.errstate(over="ignore"):
        h = np.arange(n, dtype=np.uint32) + np.uint32(salt)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    nibbles = (h[:, None] >> np.arange(28, -1, -4, dtype=np.uint32)) & np.uint32(0xF)
    return np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]


def raw_vocabulary(feature: str) -> np.ndarray:
    """Every raw value a categorical feature can take, as a numpy ``S8`` array.

    Takes a categorical column name (``item_id``, ``category``, ...).  Returns the
    8-hex-digit strings in index order (the same for every seed).

    Raises:
        ConfigError: ``feature`` is not one of the generated categorical columns.
    """
    for name, _, vocab, n, _ in CAT_COLUMNS:
        if name == feature:
            return np.ascontiguousarray(_raw_matrix(vocab, n)).view("S8").reshape(n)
    raise ConfigError(f"unknown categorical feature {feature!r}; expected one of {[c[0] for c in CAT_COLUMNS]}")


def _collision_free_buckets(name: str, raw: np.ndarray) -> int:
    b = 4 * len(raw)
    while len(np.unique(hash_values(raw, name, b))) < len(raw):
        b += 1
    return b


def make_spec(history: bool, text: bool = False) -> FeatureSpec:
    """The FeatureSpec of the generated click logs.

    Takes whether the history column is written.  Returns a spec with the 7 dense
    and 11 categorical columns in file order, sides tagged, and (with history)
    ``HistorySpec(item_feature="item_id", max_len=20)``.  Tiny vocabularies get
    the smallest collision-free bucket count >= 4x their size; the others ~3-4x.
    ``query_cat`` shares the ``category`` vocabulary (same raw value, same id).
    With ``text``: the text features ``title`` (a ``table`` text keyed by
    ``item_id``) and ``query`` (a ``request`` text, the model input ``query_emb``).
    """
    dense = tuple(DenseFeature(n, side=s, transform=t, integer=i) for n, s, t, i in DENSE_COLUMNS)
    cat = []
    for name, side, vocab, _, buckets in CAT_COLUMNS:
        if buckets is None:
            buckets = _collision_free_buckets(name, raw_vocabulary(name))
        # query_cat holds categories: hashed in the category's vocabulary, a model can compare the two
        cat.append(CatFeature(name, buckets, side=side, vocabulary=None if vocab == name else vocab))
    hist = HistorySpec(item_feature="item_id", max_len=MAX_HISTORY) if history else None
    texts = (TextFeature("title", source="table", side="item", key="item_id"),
             TextFeature("query", source="request", side="context")) if text else ()
    return FeatureSpec(dense=dense, cat=tuple(cat), history=hist, name="ecommerce",
                       extra={"generator": GENERATOR}, text=texts)


# --------------------------------------------------------------------- the world
def _zipf_cdf(n: int, offset: float, exponent: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Zipf-like weights ``(rank + offset)^-exponent`` on shuffled ranks: (weights, cdf)."""
    w = (rng.permutation(n) + 1 + offset) ** -exponent
    w /= w.sum()
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return w, cdf


def _draw(cdf: np.ndarray, rng: np.random.Generator, shape: Any) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(shape), side="right"), len(cdf) - 1)


def _text_table(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Formatting table: ``uint8 [k+1, width]`` + lengths; the extra last row is empty (index -1)."""
    arr = np.array([s.encode() for s in strings] + [b""])
    width = max(arr.dtype.itemsize, 1)
    mat = np.frombuffer(arr.astype(f"S{width}").tobytes(), dtype=np.uint8).reshape(len(arr), width)
    return mat, np.strings.str_len(arr)


class _World:
    """Everything drawn once from the seed: entities, their attributes, the planted effects."""

    def __init__(self, seed: int, p: WorldParams):
        rng = np.random.default_rng([seed, 0])
        K = p.latent_dim
        self.p = p
        # categories and items
        self.cat_w, self.cat_cdf = _zipf_cdf(N_CATEGORIES, 5, 0.8, rng)
        self.item_w, self.item_cdf = _zipf_cdf(N_ITEMS, 10, 1.0, rng)
        self.item_cat = np.concatenate([np.arange(N_CATEGORIES), _draw(self.cat_cdf, rng, N_ITEMS - N_CATEGORIES)])
        self.item_cat = rng.permutation(self.item_cat)
        self.cat_w = np.bincount(self.item_cat, weights=self.item_w, minlength=N_CATEGORIES)
        self.cat_cdf = np.cumsum(self.cat_w) / self.cat_w.sum()
        # items grouped by category; item k of category c covers [c + F(k-1), c + F(k)) where F is
        # the popularity cdf within c (its last value exactly 1), so one searchsorted draws any category
        self.items_by_cat = np.argsort(self.item_cat, kind="stable")
        c_sorted = self.item_cat[self.items_by_cat]
        cum = np.cumsum(self.item_w[self.items_by_cat])
        starts = np.searchsorted(c_sorted, np.arange(N_CATEGORIES))
        before = np.append(0.0, cum)[starts]
        last = cum[np.append(starts[1:], N_ITEMS) - 1]
        self.cat_item_cdf = c_sorted + (cum - before[c_sorted]) / (last - before)[c_sorted]
        _, brand_cdf = _zipf_cdf(N_BRANDS, 5, 0.9, rng)
        _, shop_cdf = _zipf_cdf(N_SHOPS, 5, 0.9, rng)
        self.item_brand = np.where(rng.random(N_ITEMS) < 0.08, -1, _draw(brand_cdf, rng, N_ITEMS))
        self.item_shop = _draw(shop_cdf, rng, N_ITEMS)
        cat_log_price = rng.normal(3.3, 0.9, N_CATEGORIES)
        price = np.maximum(np.exp(cat_log_price[self.item_cat] + rng.normal(0, 0.4, N_ITEMS)), 0.99)
        price_txt = [f"{x:.2f}" for x in price]
        self.item_price = np.array(price_txt, dtype="S").astype(np.float64)
        self.cat_log_price = cat_log_price
        quality = rng.normal(0, 1, N_ITEMS)
        self.item_eff = p.item_effect * quality
        reviews = rng.poisson(30 * (self.item_w / self.item_w.mean()) ** 0.7 * np.exp(rng.normal(0, 1.2, N_ITEMS)))
        rating = np.clip(4.1 + 0.5 * quality + rng.normal(0, 0.3, N_ITEMS), 1.0, 5.0)
        rating_txt = [f"{r:.1f}" if n > 0 else "" for r, n in zip(rating, reviews)]
        self.item_rating = np.array([float(t) if t else np.nan for t in rating_txt])
        self.item_reviews = reviews
        self.cat_eff = rng.normal(0, p.category_effect, N_CATEGORIES)
        self.brand_eff = np.append(rng.normal(0, p.brand_effect, N_BRANDS), 0.0)   # index -1: no brand
        self.shop_eff = rng.normal(0, p.shop_effect, N_SHOPS)
        cat_vec = rng.normal(0, 1 / np.sqrt(K), (N_CATEGORIES, K))
        self.item_vec = cat_vec[self.item_cat] + rng.normal(0, 0.5 / np.sqrt(K), (N_ITEMS, K))
        # users
        user_w, self.user_cdf = _zipf_cdf(N_USERS, 20, 1.0, rng)
        self.user_heavy = np.argsort(np.argsort(user_w)) / (N_USERS - 1)          # 1 = most active
        seg_p = rng.dirichlet(np.full(N_SEGMENTS, 5.0))
        self.user_segment = _draw(np.cumsum(seg_p), rng, N_USERS)
        _, region_cdf = _zipf_cdf(N_REGIONS, 2, 1.0, rng)
        self.user_region = np.where(rng.random(N_USERS) < 0.03, -1, _draw(region_cdf, rng, N_USERS))
        self.user_device = _draw(np.cumsum([0.45, 0.3, 0.2, 0.05]), rng, N_USERS)
        seg_taste = rng.normal(0, 1.0, (N_SEGMENTS, N_CATEGORIES)) + 0.5 * np.log(self.cat_w)
        self.user_fav = np.empty((N_USERS, 4), dtype=np.int64)
        for s in range(N_SEGMENTS):
            members = np.flatnonzero(self.user_segment == s)
            taste = np.exp(seg_taste[s] - seg_taste[s].max())
            self.user_fav[members] = _draw(np.cumsum(taste) / taste.sum(), rng, (len(members), 4))
        fav_w = rng.dirichlet(np.ones(4), N_USERS)
        self.user_fav_cum = np.cumsum(fav_w, axis=1)
        self.user_vec = (np.einsum("uk,ukd->ud", fav_w, cat_vec[self.user_fav])
                         + rng.normal(0, 0.3 / np.sqrt(K), (N_USERS, K)))
        orders = rng.poisson(0.3 + 6 * self.user_heavy ** 2 * np.exp(rng.normal(0, 0.5, N_USERS)))
        z = np.log1p(orders)
        self.user_eff = p.user_effect * (0.6 * (z - z.mean()) / z.std() + 0.8 * rng.normal(0, 1, N_USERS))
        age = rng.integers(0, 3650, N_USERS)
        guest = rng.random(N_USERS) < 0.04
        self.seg_eff = rng.normal(0, p.segment_effect, N_SEGMENTS)
        self.region_eff = np.append(rng.normal(0, p.region_effect, N_REGIONS), 0.0)
        self.dev_eff = rng.normal(0, p.device_effect, N_DEVICES)
        hours = np.arange(N_HOURS)
        self.hour_cdf = np.cumsum(np.exp(0.9 * np.cos(2 * np.pi * (hours - 20) / 24)))
        self.hour_cdf /= self.hour_cdf[-1]
        self.hour_eff = p.hour_amplitude * np.cos(2 * np.pi * (hours - 21) / 24)
        self.seg_cat = rng.normal(0, p.seg_x_cat, (N_SEGMENTS, N_CATEGORIES))
        self.dev_cat = rng.normal(0, p.dev_x_cat, (N_DEVICES, N_CATEGORIES))
        self.price_sens = rng.uniform(*p.price_sensitivity, N_SEGMENTS)
        # formatting tables (uint8 matrices, last row empty = missing)
        self.t_label = _text_table(["0", "1"])
        self.t_small = _text_table([str(i) for i in range(int(POS_MAX.max()) + 1)])
        self.t_price = _text_table(price_txt)
        self.t_rating = _text_table(rating_txt)
        self.t_reviews = _text_table([str(n) for n in reviews])
        self.t_orders = _text_table([str(n) for n in orders])
        self.t_age = _text_table(["" if g else str(a) for a, g in zip(age, guest)])
        self.user_orders = orders.astype(np.float64)
        self.user_age = np.where(guest, np.nan, age)
        self.t_cat = {}
        for name, _, vocab, n, _ in CAT_COLUMNS:
            mat = np.vstack([_raw_matrix(vocab, n), np.zeros((1, 8), np.uint8)])
            self.t_cat[name] = (mat, np.append(np.full(n, 8), 0))

    def pref_cat(self, user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One of each user's favourite categories, by their weights (any shape of ``user``)."""
        r = rng.random(user.shape)
        k = np.minimum((r[..., None] > self.user_fav_cum[user]).sum(-1), 3)
        return self.user_fav[user, k]

    def item_in(self, cat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """An item of category ``cat`` by popularity (any shape)."""
        idx = np.searchsorted(self.cat_item_cdf, cat + rng.random(cat.shape), side="right")
        return self.items_by_cat[np.minimum(idx, N_ITEMS - 1)]


# --------------------------------------------------------------------- text (--text)
#: product concepts: (title words, query words); the two lists share no word
CONCEPTS = (
    (("sneakers", "trainers"), ("running shoes", "athletic footwear")),
    (("sofa", "couch"), ("settee", "loveseat")),
    (("laptop", "notebook computer"), ("portable pc", "ultrabook")),
    (("smartphone", "mobile phone"), ("cellphone", "handset")),
    (("headphones", "headset"), ("earbuds", "in-ear monitors")),
    (("jacket", "coat"), ("parka", "anorak")),
    (("trousers", "pants"), ("slacks", "chinos")),
    (("dress", "gown"), ("frock", "sundress")),
    (("handbag", "purse"), ("tote", "clutch")),
    (("wristwatch", "watch"), ("timepiece", "chronograph")),
    (("television", "tv"), ("flat screen", "smart display")),
    (("refrigerator", "fridge"), ("icebox", "cooler appliance")),
    (("vacuum cleaner", "hoover"), ("carpet sweeper", "dust buster")),
    (("coffee maker", "espresso machine"), ("java brewer", "cappuccino appliance")),
    (("bicycle", "bike"), ("cycle", "two-wheeler")),
    (("stroller", "pram"), ("pushchair", "buggy")),
    (("lamp", "light"), ("lantern", "luminaire")),
    (("backpack", "rucksack"), ("knapsack", "daypack")),
    (("sunglasses", "shades"), ("aviators", "uv eyewear")),
    (("perfume", "fragrance"), ("cologne", "eau de toilette")),
    (("lipstick", "lip colour"), ("rouge", "tinted balm")),
    (("power drill", "drill"), ("screwdriver gun", "driver tool")),
    (("tent", "shelter"), ("camping canopy", "bivouac")),
    (("novel", "book"), ("paperback", "hardcover story")),
    (("frying pan", "pan"), ("skillet", "wok")),
    (("printer", "inkjet"), ("copier", "laser device")),
    (("camera", "dslr"), ("mirrorless", "camcorder")),
    (("guitar", "acoustic guitar"), ("six-string", "stratocaster")),
    (("dog food", "kibble"), ("pet chow", "canine meal")),
    (("vitamins", "supplements"), ("nutrition tablets", "capsules")),
    (("jeans", "denim"), ("dungarees", "levis")),
    (("scarf", "shawl"), ("muffler", "stole")),
)
COLOURS = (
    (("red", "scarlet"), ("crimson", "ruby")), (("blue", "navy"), ("azure", "cobalt")),
    (("black", "jet black"), ("ebony", "onyx")), (("white", "ivory"), ("snow", "pearl")),
    (("green", "olive"), ("emerald", "lime")), (("grey", "charcoal"), ("silver", "slate")),
    (("pink", "rose"), ("blush", "fuchsia")), (("brown", "tan"), ("chocolate", "beige")),
)
AUDIENCES = (
    (("men's", "for men"), ("gentlemen", "male")), (("women's", "for women"), ("ladies", "female")),
    (("kids'", "children's"), ("junior", "boys and girls")), (("unisex", "for all"), ("everyone", "gender neutral")),
)
TITLE_FILLERS = ("classic", "premium", "new", "deluxe", "lightweight", "2024 edition", "best seller", "original")
QUERY_P_COLOUR, QUERY_P_AUDIENCE = 0.7, 0.6


class _TextWorld:
    """The items' concepts, colours, audiences and titles (drawn from ``(seed, 3)``); queries per block."""

    def __init__(self, seed: int, w: "_World"):
        rng = np.random.default_rng([seed, 3])
        nc = len(CONCEPTS)
        self.cat_concepts = np.stack([rng.permutation(nc)[:2] for _ in range(N_CATEGORIES)])  # [cats, 2]
        self.item_concept = self.cat_concepts[w.item_cat, rng.integers(0, 2, N_ITEMS)]
        self.item_colour = rng.integers(0, len(COLOURS), N_ITEMS)
        self.item_audience = rng.integers(0, len(AUDIENCES), N_ITEMS)
        forms = rng.integers(0, 2, (N_ITEMS, 3))
        filler = rng.integers(0, len(TITLE_FILLERS), N_ITEMS)
        self.titles = [f"{TITLE_FILLERS[f]} {COLOURS[c][0][a]} {CONCEPTS[k][0][b]} {AUDIENCES[u][0][d]}"
                       for f, c, k, u, (a, b, d) in zip(filler.tolist(), self.item_colour.tolist(),
                                                        self.item_concept.tolist(), self.item_audience.tolist(),
                                                        forms.tolist())]
        self.t_title = _text_table(self.titles)

    def queries(self, ids: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
        """One block's queries (search rows only) and the relevance of each row's candidate to its query."""
        n = len(ids["item"])
        search = ids["page"] == SEARCH
        intent = np.maximum(ids["intent"], 0)
        concept = self.cat_concepts[intent, rng.integers(0, 2, n)]
        colour = np.where(rng.random(n) < QUERY_P_COLOUR, rng.integers(0, len(COLOURS), n), -1)
        audience = np.where(rng.random(n) < QUERY_P_AUDIENCE, rng.integers(0, len(AUDIENCES), n), -1)
        forms = rng.integers(0, 2, (n, 3))
        order = rng.integers(0, 3, n)
        item = ids["item"]
        asked = (colour >= 0).astype(np.float64) + (audience >= 0)
        had = (colour == self.item_colour[item]).astype(np.float64) + (audience == self.item_audience[item])
        share = np.where(asked > 0, had / np.maximum(asked, 1), 1.0)
        relevance = np.where(search & (concept == self.item_concept[item]), 0.7 + 0.3 * share, 0.0)
        text = []
        for r in np.flatnonzero(search).tolist():
            a, b, d = forms[r].tolist()
            k = CONCEPTS[concept[r]][1][b]
            c = COLOURS[colour[r]][1][a] if colour[r] >= 0 else ""
            u = AUDIENCES[audience[r]][1][d] if audience[r] >= 0 else ""
            if order[r] == 0:
                words = [c, k, u]
            elif order[r] == 1:
                words = [k, u, c]
            else:
                words = [k] + ([f"in {c}"] if c else []) + ([f"for {u}"] if u else [])
            text.append(" ".join(x for x in words if x))
        query = [""] * n
        for r, q in zip(np.flatnonzero(search).tolist(), text):
            query[r] = q
        return {"query": query, "relevance": relevance, "concept": np.where(search, concept, -1),
                "colour": np.where(search, colour, -1), "audience": np.where(search, audience, -1)}


def _add_text(tw: _TextWorld, block: dict[str, Any], rng: np.random.Generator, weight: float) -> None:
    """Put one block's queries in ``ids`` and the relevance term in ``terms`` (in place)."""
    q = tw.queries(block["ids"], rng)
    block["ids"]["query_text"] = np.array(q["query"], dtype=object)
    block["ids"]["relevance"] = q["relevance"]
    block["terms"]["text"] = weight * q["relevance"]


# --------------------------------------------------------------------- simulation
def _simulate(w: _World, rng: np.random.Generator, n: int) -> dict[str, Any]:
    """``n`` impressions: world indices (-1 = missing) and log-odds terms (bias excluded)."""
    p, rows = w.p, np.arange(n)
    user = _draw(w.user_cdf, rng, n)
    seg = w.user_segment[user]
    device = np.where(rng.random(n) < 0.85, w.user_device[user], rng.integers(0, N_DEVICES, n))
    hour = _draw(w.hour_cdf, rng, n)
    page = _draw(np.cumsum(PAGE_P), rng, n)
    has_intent = (page == SEARCH) | (rng.random(n) < 0.5)
    intent = np.where(rng.random(n) < 0.75, w.pref_cat(user, rng), _draw(w.cat_cdf, rng, n))
    intent = np.where(has_intent, intent, -1)
    # behaviour history, oldest first; the most recent entries follow the session intent
    hist_len = np.minimum(rng.negative_binomial(1, 1 / (2 + 9 * w.user_heavy[user])), MAX_HISTORY)
    recent = np.where(has_intent, np.minimum(hist_len, 1 + rng.poisson(1.5, n)), 0)
    r_idx, slot = np.nonzero(np.arange(MAX_HISTORY) < hist_len[:, None])     # filled slots only
    h_cat = np.where(rng.random(len(slot)) < 0.7, w.pref_cat(user[r_idx], rng), _draw(w.cat_cdf, rng, len(slot)))
    h_cat = np.where(slot >= (hist_len - recent)[r_idx], intent[r_idx], h_cat)
    hist = np.full((n, MAX_HISTORY), -1, dtype=np.int64)
    hist[r_idx, slot] = w.item_in(h_cat, rng)
    # the candidate: from the intent, the user's tastes, or global popularity; sometimes re-targeted
    r = rng.random(n)
    p_int = np.where(has_intent, CAND_INTENT_P[page], 0.0)
    p_pref = CAND_PREF_P[page] + np.where(has_intent, 0.0, CAND_INTENT_P[page])
    cand_cat = np.where(r < p_int, intent, np.where(r < p_int + p_pref, w.pref_cat(user, rng), -1))
    item = np.where(cand_cat >= 0, w.item_in(np.maximum(cand_cat, 0), rng), _draw(w.item_cdf, rng, n))
    retarget = (hist_len > 0) & (rng.random(n) < p.retarget_rate)
    pick = np.minimum((rng.random(n) * hist_len).astype(np.int64), MAX_HISTORY - 1)
    item = np.where(retarget, hist[rows, pick], item)
    cat = w.item_cat[item]
    position = np.minimum(rng.geometric(POS_P[page]), POS_MAX[page])
    discount = np.where(rng.random(n) < 0.3, DISCOUNTS[rng.integers(0, len(DISCOUNTS), n)], 0)
    orders_missing = rng.random(n) < 0.02
    paid = w.item_price[item] * (1 - discount / 100)
    terms = {
        "item": w.item_eff[item] + w.cat_eff[cat] + w.brand_eff[w.item_brand[item]] + w.shop_eff[w.item_shop[item]],
        "user": w.user_eff[user] + w.seg_eff[seg] + w.region_eff[w.user_region[user]],
        "context": (w.dev_eff[device] + w.hour_eff[hour] + np.asarray(p.page_effects)[page]
                    - p.position_slope * np.log(position) + p.sale_badge * (discount > 0)),
        "seg_x_cat": w.seg_cat[seg, cat],
        "dev_x_cat": w.dev_cat[device, cat],
        "price_x_seg": -w.price_sens[seg] * (np.log(paid) - w.cat_log_price[cat]),
        "affinity": p.affinity * np.einsum("ij,ij->i", w.user_vec[user], w.item_vec[item]),
        "intent": p.intent_boost * (cat == intent),
        "repeat": p.repeat_boost * (hist == item[:, None]).any(axis=1),
    }
    ids = {"user": user, "segment": seg, "region": w.user_region[user], "device": device, "hour": hour,
           "page": page, "query": np.where(page == SEARCH, intent, -1), "intent": intent, "item": item,
           "category": cat, "brand": w.item_brand[item], "shop": w.item_shop[item], "position": position,
           "discount": discount, "orders_missing": orders_missing, "hist": hist, "hist_len": hist_len}
    return {"ids": ids, "terms": terms, "u_label": rng.random(n)}


def _solve_bias(w: _World, seed: int, click_rate: float, tw: _TextWorld | None = None) -> float:
    """Bias whose mean click probability on a 32k-row sample equals ``click_rate`` (bisection)."""
    sample = _simulate(w, np.random.default_rng([seed, 2]), 2 * BLOCK_ROWS)
    if tw is not None:
        _add_text(tw, sample, np.random.default_rng([seed, 5]), w.p.text_relevance)
    logit = sum(sample["terms"].values())
    lo, hi = -30.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(logit + mid)))) < click_rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _chunks(w: _World, seed: int, rows: int, bias: float, chunk_rows: int,
            tw: _TextWorld | None = None) -> Iterator[dict[str, Any]]:
    """Simulated rows in chunks of whole blocks (the last one cut at ``rows``), with probs and labels.

    ``seed`` is the sample seed: block ``b`` draws from ``default_rng([seed, 1, b])``, and its
    queries (with ``tw``) from ``default_rng([seed, 4, b])``.
    """
    per_chunk = -(-chunk_rows // BLOCK_ROWS)
    n_blocks = -(-rows // BLOCK_ROWS)
    for first in range(0, n_blocks, per_chunk):
        blocks = [_simulate(w, np.random.default_rng([seed, 1, b]), BLOCK_ROWS)
                  for b in range(first, min(first + per_chunk, n_blocks))]
        if tw is not None:
            for b, block in zip(range(first, n_blocks), blocks):
                _add_text(tw, block, np.random.default_rng([seed, 4, b]), w.p.text_relevance)
        take = min(rows - first * BLOCK_ROWS, len(blocks) * BLOCK_ROWS)
        out = {k: {name: np.concatenate([b[k][name] for b in blocks])[:take] for name in blocks[0][k]}
               for k in ("ids", "terms")}
        logit = bias + sum(out["terms"].values())
        out["probs"] = (1 / (1 + np.exp(-logit))).astype(np.float32)
        out["labels"] = (np.concatenate([b["u_label"] for b in blocks])[:take] < out["probs"]).astype(np.int8)
        yield out


# --------------------------------------------------------------------- formatting
def _fields(w: _World, c: dict[str, Any], history: bool,
            tw: _TextWorld | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every column of a chunk as ``(uint8 [n, width], byte lengths [n])``, in file order."""
    ids = c["ids"]

    def look(table: tuple[np.ndarray, np.ndarray], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return table[0][idx], table[1][idx]

    item, user = ids["item"], ids["user"]
    out = [look(w.t_label, c["labels"]),
           look(w.t_price, item), look(w.t_small, ids["discount"]), look(w.t_rating, item),
           look(w.t_reviews, item), look(w.t_orders, np.where(ids["orders_missing"], -1, user)),
           look(w.t_age, user), look(w.t_small, ids["position"])]
    for name, _, _, _, _ in CAT_COLUMNS:
        out.append(look(w.t_cat[name], _cat_index(ids, name)))
    if history:
        n = len(item)
        mat = np.full((n, MAX_HISTORY, 9), ord(","), dtype=np.uint8)
        mat[:, :, :8] = w.t_cat["item_id"][0][ids["hist"]]
        out.append((mat.reshape(n, MAX_HISTORY * 9), np.maximum(9 * ids["hist_len"] - 1, 0)))
    if tw is not None:
        out.append(look(tw.t_title, item))
        queries = _text_table(list(ids["query_text"]))
        out.append(look(queries, np.arange(len(item))))
    return out


def _cat_index(ids: dict[str, np.ndarray], name: str) -> np.ndarray:
    key = {"user_id": "user", "user_segment": "segment", "page_type": "page", "query_cat": "query",
           "item_id": "item"}.get(name, name)
    return ids[key]


def _format(fields: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Join fields with tabs and rows with newlines: one boolean mask over a byte matrix."""
    n = len(fields[0][1])
    width = sum(mat.shape[1] + 1 for mat, _ in fields)
    text = np.full((n, width), ord("\t"), dtype=np.uint8)
    keep = np.ones((n, width), dtype=bool)
    at = 0
    for mat, lens in fields:
        k = mat.shape[1]
        text[:, at:at + k] = mat
        keep[:, at:at + k] = np.arange(k) < lens[:, None]
        at += k + 1                      # the separator after the field stays a tab ...
    text[:, -1] = ord("\n")             # ... except the last one
    return text[keep].tobytes()


# --------------------------------------------------------------------- the learnable ceiling
#: the planted effects' keys the ceiling's logistic regression is given (one-hot each, plus
#: price-ratio x segment as 8 numeric columns); affinity (user taste . item vector) enters as user x category
CEILING_KEYS = ("item", "category", "brand", "shop", "user", "segment", "region", "device", "hour", "page",
                "position", "sale", "segment_x_category", "device_x_category", "intent_match", "repeat",
                "user_x_category")
#: L2 strengths (scikit-learn's C) tried on the valid part (on the demo data valid AUC fell from C=0.1 to 1.0)
CEILING_C = (0.01, 0.03, 0.1)
#: the split ``ctredge train`` uses by default (TrainConfig: split_valid, split_test)
DEFAULT_SPLIT = (0.1, 0.1)


def _ceiling_keys(w: _World, ids: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(int64 keys [n, len(CEILING_KEYS)], price ratio [n])`` of one chunk: the true structure of each row."""
    cat, seg, dev, item = ids["category"], ids["segment"], ids["device"], ids["item"]
    discount = ids["discount"]
    repeat = (ids["hist"] == item[:, None]).any(axis=1)
    cols = [item, cat, ids["brand"] + 1, ids["shop"], ids["user"], seg, ids["region"] + 1, dev, ids["hour"],
            ids["page"], ids["position"], (discount > 0).astype(np.int64), seg * N_CATEGORIES + cat,
            dev * N_CATEGORIES + cat, (cat == ids["intent"]).astype(np.int64), repeat.astype(np.int64),
            ids["user"].astype(np.int64) * N_CATEGORIES + cat]
    paid = w.item_price[item] * (1 - discount / 100)
    return np.column_stack(cols).astype(np.int64), (np.log(paid) - w.cat_log_price[cat])


def _ceiling_matrix(keys: np.ndarray, ratio: np.ndarray, seg: np.ndarray) -> Any:
    """Sparse design matrix: one column per distinct (key, value), then price ratio in its segment's column."""
    from scipy import sparse

    n, k = keys.shape
    cols, at = [], 0
    for j in range(k):
        _, inv = np.unique(keys[:, j], return_inverse=True)
        cols.append(inv.reshape(-1) + at)
        at += int(inv.max()) + 1
    cols.append(seg + at)
    indices = np.column_stack(cols).reshape(-1)
    data = np.column_stack([np.ones((n, k)), ratio[:, None]]).reshape(-1)
    indptr = np.arange(0, n * (k + 1) + 1, k + 1)
    return sparse.csr_matrix((data, indices, indptr), shape=(n, at + N_SEGMENTS))


def learnable_ceiling(keys: np.ndarray, ratio: np.ndarray, seg: np.ndarray, labels: np.ndarray,
                      codes: np.ndarray) -> dict[str, Any]:
    """The logistic regression on the true structure: fit on ``codes == 0``, C on 1, scored on 2.

    Returns ``{"status": "measured", "test_auc", "test_logloss", "valid_auc" by C, "C", "rows", ...}``
    or ``{"status": "skipped", "reason"}`` without scikit-learn (or with an empty part).
    """
    import time

    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        return {"status": "skipped", "reason": f"scikit-learn is not installed ({exc}); pip install ctredge[baselines]"}
    parts = [codes == i for i in range(3)]
    if any(not m.any() or labels[m].min() == labels[m].max() for m in parts):
        return {"status": "skipped", "reason": "a train/valid/test part has no rows or one class only"}
    t0 = time.perf_counter()
    x = _ceiling_matrix(keys, ratio, seg)
    xt, xv, xs = (x[m] for m in parts)
    yt = labels[parts[0]]
    valid_auc, fitted = {}, {}
    for c in CEILING_C:
        model = LogisticRegression(C=c, max_iter=300, tol=1e-5)
        model.fit(xt, yt)
        fitted[c] = model
        valid_auc[str(c)] = metrics.auc(labels[parts[1]], model.predict_proba(xv)[:, 1])
    best = max(CEILING_C, key=lambda c: valid_auc[str(c)])
    p = fitted[best].predict_proba(xs)[:, 1]
    ys = labels[parts[2]]
    return {"status": "measured", "model": "logistic regression (scikit-learn lbfgs, L2) on one-hot keys of the "
                                            "planted effects", "keys": list(CEILING_KEYS),
            "numeric": "log(paid price / category median) x segment", "C": best, "valid_auc_by_C": valid_auc,
            "test_auc": metrics.auc(ys, p), "test_logloss": metrics.logloss(ys, p),
            "train_rows": int(parts[0].sum()), "valid_rows": int(parts[1].sum()), "test_rows": int(parts[2].sum()),
            "columns": int(x.shape[1]), "seconds": round(time.perf_counter() - t0, 2)}


def default_split_codes(rows: int, split_seed: int) -> np.ndarray:
    """0/1/2 (train/valid/test) of a file's rows under ``ctredge train``'s default split of that one file."""
    from ctredge.reader import SplitSpec

    line_no = np.arange(1, rows + 1, dtype=np.int64)
    return SplitSpec(seed=split_seed, valid=DEFAULT_SPLIT[0], test=DEFAULT_SPLIT[1]).codes(
        np.zeros(rows, dtype=np.int64), line_no)


def _scope(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    return {"rows": int(labels.size), "click_rate": float(labels.mean()), "bayes_auc": metrics.auc(labels, probs),
            "bayes_logloss": metrics.logloss(labels, probs)}


# --------------------------------------------------------------------- public API
def _check_args(rows: Any, seed: Any, click_rate: Any, chunk_rows: Any, sample_seed: Any = None) -> None:
    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(rows) or rows < 1:
        raise ConfigError(f"datagen: rows must be an integer >= 1, got {rows!r}")
    if not is_int(seed) or seed < 0:
        raise ConfigError(f"datagen: seed must be an integer >= 0, got {seed!r}")
    if sample_seed is not None and (not is_int(sample_seed) or sample_seed < 0):
        raise ConfigError(f"datagen: sample_seed must be an integer >= 0, got {sample_seed!r}")
    if isinstance(click_rate, bool) or not isinstance(click_rate, (int, float)) or not 0 < click_rate <= 0.5:
        raise ConfigError(f"datagen: click_rate must be a number in (0, 0.5], got {click_rate!r}")
    if not is_int(chunk_rows) or chunk_rows < 1:
        raise ConfigError(f"datagen: chunk_rows must be an integer >= 1, got {chunk_rows!r}")


def _truth(rows: int, seed: int, history: bool, click_rate: float, bias: float,
           labels: np.ndarray, probs: np.ndarray, sample_seed: int | None = None,
           split_seed: int = 0) -> dict[str, Any]:
    sample = seed if sample_seed is None else sample_seed
    codes = default_split_codes(len(labels), split_seed)
    test = codes == 2
    scopes: dict[str, Any] = {"all": _scope(labels, probs)}
    if test.any() and labels[test].min() != labels[test].max():
        scopes["test"] = {**_scope(labels[test], probs[test]),
                          "split": {"seed": int(split_seed), "valid": DEFAULT_SPLIT[0], "test": DEFAULT_SPLIT[1],
                                    "part": "test"}}
    return {
        "generator": GENERATOR, "rows": int(rows), "seed": int(seed), "sample_seed": int(sample),
        "history": bool(history), "scopes": scopes,
        "click_rate_target": float(click_rate), "click_rate": float(labels.mean()),
        "mean_true_prob": float(probs.astype(np.float64).mean()),
        "bayes_auc": metrics.auc(labels, probs), "bayes_logloss": metrics.logloss(labels, probs),
        "bias": bias, "block_rows": BLOCK_ROWS, "max_history": MAX_HISTORY,
        "sizes": {"users": N_USERS, "items": N_ITEMS, "categories": N_CATEGORIES, "brands": N_BRANDS,
                  "shops": N_SHOPS, "segments": N_SEGMENTS, "regions": N_REGIONS, "devices": N_DEVICES},
        "params": json.loads(json.dumps(dataclasses.asdict(WorldParams()))),   # tuples -> lists, as on disk
    }


def generate_arrays(rows: int, seed: int = 0, history: bool = False, click_rate: float = 0.03,
                    sample_seed: int | None = None, text: bool = False) -> dict[str, Any]:
    """The rows :func:`generate` writes, in memory (for tests and analysis; small ``rows``).

    Takes the same configuration as :func:`generate`.  Returns a dict with
    ``labels`` (int8 [n]), ``probs`` (float32 [n], the true click probabilities),
    ``dense`` (float32 [n, 7], NaN = missing, as the reader parses them),
    ``cat_raw`` (``S8`` [n, 11], ``b""`` = missing), ``history`` (per row, a list of
    raw item ids, oldest first; ``None`` without history), ``ids`` (world indices
    per row, -1 = missing), ``terms`` (each planted log-odds term per row), and
    ``truth`` (what ``FILE.truth.json`` holds, except ``data_sha256``); with
    ``text`` also ``title`` and ``query`` (lists of ``str``, ``""`` = no query) and
    ``relevance`` (float [n], the true query-title relevance, 0 off search pages).

    Raises:
        ConfigError: ``rows`` < 1, ``seed`` < 0 or ``click_rate`` outside (0, 0.5].
    """
    _check_args(rows, seed, click_rate, BLOCK_ROWS, sample_seed)
    w = _World(seed, WorldParams())
    tw = _TextWorld(seed, w) if text else None
    bias = _solve_bias(w, seed, click_rate, tw)
    c = next(_chunks(w, seed if sample_seed is None else sample_seed, rows, bias, rows, tw))
    ids = c["ids"]
    dense = np.column_stack([
        w.item_price[ids["item"]], ids["discount"], w.item_rating[ids["item"]],
        w.item_reviews[ids["item"]], np.where(ids["orders_missing"], np.nan, w.user_orders[ids["user"]]),
        w.user_age[ids["user"]], ids["position"]]).astype(np.float32)
    cat_raw = np.empty((rows, len(CAT_COLUMNS)), dtype="S8")
    for j, (name, _, _, _, _) in enumerate(CAT_COLUMNS):
        cat_raw[:, j] = w.t_cat[name][0].view("S8").reshape(-1)[_cat_index(ids, name)]   # last row: b""
    hist = None
    if history:
        item_raw = raw_vocabulary("item_id")
        hist = [list(item_raw[h[:k]]) for h, k in zip(ids["hist"], ids["hist_len"])]
    out = {"labels": c["labels"], "probs": c["probs"], "dense": dense, "cat_raw": cat_raw, "history": hist,
           "ids": ids, "terms": c["terms"],
           "truth": _truth(rows, seed, history, click_rate, bias, c["labels"], c["probs"], sample_seed)}
    if tw is not None:
        out["title"] = [tw.titles[i] for i in ids["item"].tolist()]
        out["query"] = list(ids["query_text"])
        out["relevance"] = ids["relevance"]
        out["truth"]["text"] = _text_truth(w, c["labels"], c["probs"], c["terms"]["text"], ids["relevance"])
    return out


def _text_truth(w: _World, labels: np.ndarray, probs: np.ndarray, term: np.ndarray,
                relevance: np.ndarray) -> dict[str, Any]:
    """What the truth file records of ``--text``: the term, and the Bayes AUC with and without it."""
    logit = np.log(probs.astype(np.float64)) - np.log1p(-probs.astype(np.float64))
    without = 1 / (1 + np.exp(-(logit - term)))
    search = relevance > 0
    return {"columns": ["title", "query"], "term": "text_relevance x relevance (search rows)",
            "text_relevance": w.p.text_relevance, "concepts": len(CONCEPTS), "colours": len(COLOURS),
            "audiences": len(AUDIENCES), "query_p_colour": QUERY_P_COLOUR, "query_p_audience": QUERY_P_AUDIENCE,
            "relevant_rows": int(search.sum()), "mean_relevance": float(relevance.mean()),
            "bayes_auc": metrics.auc(labels, probs), "bayes_auc_without_text_term": metrics.auc(labels, without)}


def generate(out_path: str, rows: int, seed: int = 0, history: bool = False, click_rate: float = 0.03,
             chunk_rows: int = 100_000, progress: Callable[[int, int], None] | None = None, *,
             sample_seed: int | None = None, split_seed: int = 0, ceiling: bool = False,
             text: bool = False) -> dict[str, Any]:
    """Write ``rows`` synthetic click-log rows to ``out_path`` plus its spec and truth files.

    Takes the output path (``.tsv``; ``.gz`` writes gzip), the row count, the seed
    (same seed -> byte-identical files), whether to write the history column, the
    target click rate (the observed one lands near it), rows simulated and written
    per step, and an optional ``progress(rows_done, rows_total)`` callback.
    Writes ``out_path`` (via a temporary file, renamed into place),
    ``<base>.spec.json`` (:func:`make_spec`) and ``<base>.truth.json``.  Returns
    the truth dict: ``rows``, observed ``click_rate``, ``bayes_auc`` and
    ``bayes_logloss`` of the true probabilities on those rows, ``scopes``
    (``all`` and ``test``: the default test part under ``split_seed``),
    ``seed``, ``sample_seed``, ``history``, ``data_sha256``, the generator's
    parameters and, with ``ceiling``, ``ceiling`` (:func:`learnable_ceiling`,
    with its seconds).  ``sample_seed`` (default: ``seed``) draws the rows from
    the world of ``seed``.  ``text`` appends the ``title`` and ``query`` columns,
    adds the relevance term to the click log-odds and records ``text`` in the
    truth (:func:`_text_truth`).

    Raises:
        ConfigError: ``rows`` < 1, ``seed`` < 0, ``click_rate`` outside (0, 0.5] or
            ``chunk_rows`` < 1.
        DataError: the output (or its folder) cannot be created or written.
    """
    _check_args(rows, seed, click_rate, chunk_rows, sample_seed)
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)) or split_seed < 0:
        raise ConfigError(f"datagen: split_seed must be an integer >= 0, got {split_seed!r}")
    sample = seed if sample_seed is None else sample_seed
    out_path = os.fspath(out_path)
    spec_path, truth_path = sidecar_path(out_path, "spec"), sidecar_path(out_path, "truth")
    tmp = out_path + ".tmp"
    w = _World(seed, WorldParams())
    tw = _TextWorld(seed, w) if text else None
    bias = _solve_bias(w, seed, click_rate, tw)
    digest = hashlib.sha256()
    labels, probs, done = [], [], 0
    text_terms, relevances = [], []
    keys, ratios, segs = [], [], []
    try:
        parent = os.path.dirname(out_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(tmp, "wb") as raw_fh:
            fh = gzip.GzipFile(filename="", mode="wb", fileobj=raw_fh, mtime=0) if out_path.endswith(".gz") else raw_fh
            for c in _chunks(w, sample, rows, bias, chunk_rows, tw):
                data = _format(_fields(w, c, history, tw))
                if tw is not None:
                    text_terms.append(c["terms"]["text"])
                    relevances.append(c["ids"]["relevance"])
                if ceiling:
                    k, r = _ceiling_keys(w, c["ids"])
                    keys.append(k)
                    ratios.append(r)
                    segs.append(c["ids"]["segment"])
                fh.write(data)
                digest.update(data)
                labels.append(c["labels"])
                probs.append(c["probs"])
                done += len(c["labels"])
                if progress is not None:
                    progress(done, rows)
            if fh is not raw_fh:
                fh.close()
        if os.path.exists(truth_path):
            os.remove(truth_path)           # never leave a truth file beside other rows
        os.replace(tmp, out_path)
        make_spec(history, text).save(spec_path)
        all_labels = np.concatenate(labels)
        truth = _truth(rows, seed, history, click_rate, bias, all_labels, np.concatenate(probs), sample_seed,
                       split_seed)
        if tw is not None:
            truth["text"] = _text_truth(w, all_labels, np.concatenate(probs), np.concatenate(text_terms),
                                        np.concatenate(relevances))
        if ceiling:
            truth["ceiling"] = learnable_ceiling(np.concatenate(keys), np.concatenate(ratios), np.concatenate(segs),
                                                 all_labels, default_split_codes(rows, split_seed))
            truth["ceiling"]["split"] = truth["scopes"].get("test", {}).get("split")
        truth["data_sha256"] = digest.hexdigest()   # of the uncompressed text
        with open(truth_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(truth, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise DataError(f"cannot write synthetic click log: {exc.strerror or exc}; expected a writable path",
                        path=out_path) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return truth
