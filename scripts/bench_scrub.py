"""Card scrub benchmark: cards missed, products and loyalty numbers lost, time per receipt.

    .venv/bin/python scripts/bench_scrub.py [--n 1000000] [--old-sample 100000] [--seed 7]

Deterministic (seeded). Three measures, each beside the previous scrub (`edge/privacy/
scrub.py` at commit OLD_COMMIT, loaded from git when the repository has it) on a sample:

1. PANs: `--n` valid PANs of every network (`edge.privacy.cards.NETWORKS`, every range,
   every issued length) and of issuers outside that table (`OUTSIDE`: UzCard, Humo,
   BORICA, Belkart, China T-Union, fuel/private-label 7..., 35xx outside JCB), each in one
   printed form (plain, 4-grouped with space, dash or dot,
   Amex 4-6-5, Diners 4-6-4, 19-digit 4-4-4-4-3 / 6-13, double-spaced), inside one context
   (alone, inside text, on a receipt payment line, in magnetic-track and barcode payloads),
   rotating; a miss is a PAN whose digits are still in the output. Target: 0.
2. GTINs: `--n` valid GTIN-8/12/13/14 with GS1 prefixes drawn by a rough share of codes in
   trade (US/Canada, Germany, France, UK, Japan, China, Italy, ...; GTIN-14 with indicator
   0-9), alone and followed by a quantity after one space, a tab or two spaces (with and
   without " x <price>"); scrubbed = any card removed. Target: <= 0.1 %. Beside it, no
   target: GTIN-13/14 in running text, outside GS1 context, where a Luhn-valid one is
   scrubbed (privacy first).
3. Loyalty: `--n` valid EAN-13 loyalty numbers (in-store prefixes 20-29 and the GS1
   prefixes above) as `loyalty_id` identifiers through `CardScrubStage` (where a card given
   as a loyalty number is dropped), a sample also through `PrivacyStage`; and as receipt
   text "Loyalty: <number>" through the whole pipeline's first two stages. Target: <= 0.1 %.
4. Speed: `scrub_cards` on simulated receipts (`drivers.pos.sim.PosSim`) and on short
   non-receipt strings, new and old, microseconds per call.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from drivers.pos.config import PosLink
from drivers.pos.receipt import parse_receipt
from edge.clock import FakeClock
from edge.events import Ident, Reading
from edge.privacy.cards import NETWORKS, gtin_check_digit, luhn_complete
from edge.privacy.scrub import holds_card, scrub_cards
from edge.privacy.stage import CardScrubStage

OLD_COMMIT = "97a42d02dcfcd8d1c75b3af7b32d3d88395cacce"  # the scrub of issue 18 point 9
ROOT = Path(__file__).resolve().parent.parent

# GS1 prefixes (3 digits, first of a range) with a rough weight of their share of codes
GS1 = [
    ("000", 8), ("030", 2), ("060", 6), ("070", 5), ("080", 4), ("090", 3), ("100", 3), ("300", 6),
    ("340", 3), ("400", 8), ("420", 4), ("440", 2), ("450", 4), ("490", 3), ("460", 2), ("471", 1),
    ("500", 5), ("540", 2), ("560", 1), ("570", 1), ("590", 2), ("600", 1), ("640", 1), ("690", 8),
    ("692", 4), ("700", 1), ("730", 1), ("760", 2), ("789", 2), ("800", 4), ("840", 3), ("870", 2),
    ("880", 2), ("890", 2), ("900", 2), ("930", 2), ("978", 2),
]  # fmt: skip
IN_STORE = [("20", 1), ("21", 1), ("23", 1), ("25", 1), ("29", 1)]


def load_old() -> ModuleType | None:
    """The previous scrub module from git, or None outside a clone that has the commit."""
    try:
        src = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:edge/privacy/scrub.py"],
            capture_output=True, check=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("old_scrub", loader=None)
    if spec is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, "old_scrub.py", "exec"), mod.__dict__)  # noqa: S102 - our own code at a pinned commit
    return mod


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choices("0123456789", k=n))


# ------------------------------------------------------------------------- PANs

# issuers outside the table (leading digits, inclusive, and a length they issue)
OUTSIDE = [
    ("8600", "8600", 16), ("9860", "9860", 16), ("2205", "2205", 16), ("9112", "9112", 16),
    ("31", "31", 19), ("7", "7", 16), ("7", "7", 19), ("3500", "3527", 16), ("3590", "3599", 16),
]  # fmt: skip
SHAPES = [(lo, hi, n) for net in NETWORKS for lo, hi in net.ranges for n in sorted(net.lengths)] + OUTSIDE


def random_pan(rng: random.Random) -> str:
    lo, hi, n = rng.choice(SHAPES)
    prefix = str(rng.randint(int(lo), int(hi))).zfill(len(lo))
    return luhn_complete(prefix + digits(rng, n - 1 - len(prefix)))


def groups(s: str, sizes: tuple[int, ...], sep: str) -> str:
    out, at = [], 0
    for k in sizes:
        out.append(s[at : at + k])
        at += k
    if at < len(s):
        out.append(s[at:])
    return sep.join(x for x in out if x)


def forms(p: str) -> list[str]:
    n = len(p)
    four = (4, 4, 4, 4, 3)
    out = [p, groups(p, four, " "), groups(p, four, "-"), groups(p, four, "."), groups(p, four, "  ")]
    out.append(groups(p, {15: (4, 6, 5), 14: (4, 6, 4), 19: (6, 13)}.get(n, four), " "))
    out.append(groups(p, four, "\u00a0"))
    return out


CONTEXTS = [
    "{}",
    "Karte {} ok",
    "paid with {}\n",
    "VISA {}                 6.63",
    "%B{}^DOE/JANE^2612101000000000?",
    ";{}=26121010000000?",
    "]C1\x1d{}\x1d1726",
    "pan={}&exp=1226",
    "Kunde: Jane, Karte:{}, Betrag 12,00",
]


def pan_misses(scrub: Callable[[str], tuple[str, int]], n: int, seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    misses = 0
    for i in range(n):
        p = random_pan(rng)
        f = forms(p)
        text = CONTEXTS[i % len(CONTEXTS)].format(f[(i // len(CONTEXTS)) % len(f)])
        out = scrub(text)[0]
        if p in "".join(ch for ch in out if ch.isdigit()):
            misses += 1
    return misses, n


# ------------------------------------------------------------------------- GTINs

_GS1_P = [p for p, _ in GS1]
_GS1_W = [w for _, w in GS1]


def random_gtin(rng: random.Random, kind: int) -> str:
    if kind == 8:
        body = rng.choice(["0", "2", "4", "5", "6", "7", "8", "9"]) + digits(rng, 6)  # GTIN-8 prefixes
    elif kind == 12:
        body = rng.choice("0136789") + digits(rng, 10)  # UPC-A number systems
    else:
        body = rng.choices(_GS1_P, _GS1_W)[0] + digits(rng, 9)
        if kind == 14:
            body = str(rng.randrange(10)) + body
    return body + gtin_check_digit(body)


GTIN_CONTEXTS = ["{g}", "{g} {q}", "{g}\t{q}", "{g}  {q}", "{g} {q} x 1.25", "{g}\t{q} x 1.25", "  {g}  {q} x 1.25"]


def gtin_losses(scrub: Callable[[str], tuple[str, int]], n: int, seed: int) -> dict[int, tuple[int, int]]:
    rng = random.Random(seed)
    by_kind: dict[int, list[int]] = {8: [0, 0], 12: [0, 0], 13: [0, 0], 14: [0, 0]}
    kinds = (8, 12, 13, 14)
    for i in range(n):
        kind = kinds[i % 4]
        g = random_gtin(rng, kind)
        q = rng.choice(("1", "1", "2", "3", "10", "0.732"))
        text = GTIN_CONTEXTS[(i // 4) % len(GTIN_CONTEXTS)].format(g=g, q=q)
        row = by_kind[kind]
        row[1] += 1
        if scrub(text)[1]:
            row[0] += 1
    return {k: (v[0], v[1]) for k, v in by_kind.items()}


def gtin_text_losses(scrub: Callable[[str], tuple[str, int]], n: int, seed: int) -> tuple[int, int]:
    """GTIN-13/14 in running text (no GS1 context): no target, a Luhn-valid one is scrubbed."""
    rng = random.Random(seed)
    lost = sum(bool(scrub(f"Artikel {random_gtin(rng, 13 + i % 2)} nachbestellt")[1]) for i in range(n))
    return lost, n


# ------------------------------------------------------------------------- loyalty


def random_loyalty(rng: random.Random) -> str:
    if rng.random() < 0.5:
        body = rng.choices([p for p, _ in IN_STORE])[0] + digits(rng, 10)
    else:
        body = rng.choices(_GS1_P, _GS1_W)[0] + digits(rng, 9)
    return body + gtin_check_digit(body)


def loyalty_losses(check: Callable[[str], bool], n: int, seed: int) -> int:
    rng = random.Random(seed)
    return sum(check(random_loyalty(rng)) for _ in range(n))


def stage_drops(n: int, seed: int) -> int:
    rng = random.Random(seed)
    stage = CardScrubStage()
    for _ in range(n):
        stage(Reading("pos", "pos.receipt", 1, {}, {"loyalty": Ident("loyalty_id", random_loyalty(rng))}))
    return stage.cards_removed


def receipt_drops(scrub: Callable[[str], tuple[str, int]], n: int, seed: int) -> int:
    rng = random.Random(seed)
    lost = 0
    for _ in range(n):
        number = random_loyalty(rng)
        text = scrub(f"TOTAL EUR 6.63\nLoyalty: {number}\nPoints earned: 6\n")[0]
        if "loyalty" not in parse_receipt(text, "t")[1]:
            lost += 1
    return lost


# ------------------------------------------------------------------------- speed


def per_call_us(fn: Callable[[str], object], texts: list[str], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for t in texts:
            fn(t)
        best = min(best, time.perf_counter() - t0)
    return best / len(texts) * 1e6


def receipts(count: int, seed: int) -> list[str]:
    from drivers.pos.sim import PosSim

    link = PosLink.model_validate({"name": "till-1", "sim": {"seed": seed}})
    sim = PosSim(link, FakeClock())
    return [sim.compose(1_767_225_600_000 + i) for i in range(count)]


def pct(a: int, b: int) -> str:
    return f"{a:>8} / {b:<8} {100.0 * a / b:7.3f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="PANs, GTINs and loyalty numbers each")
    ap.add_argument("--old-sample", type=int, default=100_000, help="sample size for the previous scrub")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    old = load_old()
    n, m, seed = a.n, a.old_sample, a.seed
    t0 = time.monotonic()
    print(f"card scrub benchmark, seed {seed}; old = {OLD_COMMIT[:7]} ({'loaded' if old else 'not available'})")
    print(f"{'measure':<44}{'new':<36}old (sample {m})")
    miss = pan_misses(scrub_cards, n, seed)
    old_miss = pan_misses(old.scrub_cards, m, seed) if old else None
    print(f"{'PANs missed (target 0)':<44}{pct(*miss):<36}{pct(*old_miss) if old_miss else '-'}")
    new_g = gtin_losses(scrub_cards, n, seed + 1)
    old_g = gtin_losses(old.scrub_cards, m, seed + 1) if old else None
    for kind in (8, 12, 13, 14):
        o = pct(*old_g[kind]) if old_g else "-"
        print(f"{f'GTIN-{kind} scrubbed':<44}{pct(*new_g[kind]):<36}{o}")
    tot = (sum(v[0] for v in new_g.values()), sum(v[1] for v in new_g.values()))
    otot = (sum(v[0] for v in old_g.values()), sum(v[1] for v in old_g.values())) if old_g else None
    print(f"{'GTINs scrubbed, all (target <= 0.1 %)':<44}{pct(*tot):<36}{pct(*otot) if otot else '-'}")
    k = min(n, 200_000)
    gt = gtin_text_losses(scrub_cards, k, seed + 4)
    ogt = gtin_text_losses(old.scrub_cards, min(k, m), seed + 4) if old else None
    print(f"{'GTIN-13/14 in running text scrubbed (none)':<44}{pct(*gt):<36}{pct(*ogt) if ogt else '-'}")
    lost = stage_drops(n, seed + 2)
    old_lost = loyalty_losses(old.holds_card, m, seed + 2) if old else None
    o = pct(old_lost, m) if old_lost is not None else "-"
    print(f"{'EAN-13 loyalty ids dropped (target <= 0.1 %)':<44}{pct(lost, n):<36}{o}")
    if loyalty_losses(holds_card, m, seed + 2) != stage_drops(m, seed + 2):
        raise SystemExit("CardScrubStage and holds_card disagree")  # the stage drops what holds_card says
    r = receipt_drops(scrub_cards, k, seed + 3)
    ro = receipt_drops(old.scrub_cards, min(k, m), seed + 3) if old else None
    print(
        f"{'EAN-13 loyalty lost from receipt text':<44}{pct(r, k):<36}{pct(ro, min(k, m)) if ro is not None else '-'}"
    )
    texts = receipts(2000, seed)
    short = ["Shelf 12", "iPhone", "4f2a9c1e-77aa-4c1b-9d2e-0c1f2a3b4c5d", "Kasse 3 Bon 1234", "x" * 40] * 400
    for label, sample in (("us per simulated receipt", texts), ("us per short string", short)):
        new_us = per_call_us(scrub_cards, sample, 5)
        old_us = per_call_us(old.scrub_cards, sample, 5) if old else None
        print(f"{'scrub_cards ' + label:<44}{new_us:<36.2f}{f'{old_us:.2f}' if old_us is not None else '-'}")
    print(f"({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
