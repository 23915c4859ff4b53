"""Receipts the rig prints on a POS line (a pty peer or a real null-modem cable).

`compose()` writes one receipt's text for a `pos.receipt` step, in the shape the daemon's
default receipt rules read (item lines `<code> <qty> x <price>`, `TOTAL`, `Loyalty:`), and
returns the raw identifiers it printed (loyalty number, a whole card number, e-mail,
phone) so the leak scan can look for them. `escpos_bytes()` renders it the way a till talks
to its receipt printer (python-escpos, ending in a paper cut), `line_bytes()` as plain lines
ending in a form feed. Identifiers are fresh per receipt (seeded), never real ones: card
numbers are Luhn-valid test-style numbers, e-mails use example domains, phones the
fictional 555-01xx range.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from edge.events import IdentClass
from edge.privacy.cards import gtin_check_digit, luhn_complete
from hil.scenario import PosReceipt

WIDTH = 42


@dataclass(slots=True, frozen=True)
class Printed:
    text: str
    identifiers: tuple[tuple[IdentClass, str], ...]


def _row(left: str, right: str) -> str:
    return f"{left:<{WIDTH - len(right) - 1}} {right}"


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def compose(step: PosReceipt, number: int, rng: random.Random) -> Printed:
    """Receipt `number` of till `step.till`."""
    ids: list[tuple[IdentClass, str]] = []
    lines = ["HIL MART".center(WIDTH), "Rig Street 1".center(WIDTH), "",
             f"Till: {step.till}", f"Receipt: 0001-{number:06d}", "-" * WIDTH]  # fmt: skip
    total = 0
    for _ in range(step.items):
        body = "40" + "".join(str(rng.randrange(10)) for _ in range(10))
        price = rng.randrange(49, 1999)
        qty = 1 if rng.random() < 0.8 else rng.randint(2, 4)
        total += qty * price
        lines += ["RIG ITEM", _row(f"  {body + gtin_check_digit(body)} {qty} x {_money(price)}", _money(qty * price))]
    lines += ["-" * WIDTH, _row("TOTAL EUR", _money(total))]
    if step.loyalty:
        loyalty = "8" + "".join(str(rng.randrange(10)) for _ in range(11))
        ids.append(("loyalty_id", loyalty))
        lines.append(f"Loyalty: {loyalty}")
    if step.pan == "cash":
        lines.append(_row("CASH", _money(-(-total // 500) * 500)))
    else:
        pan = luhn_complete("4" + "".join(str(rng.randrange(10)) for _ in range(14)))
        if step.pan == "full":
            ids.append(("card_number", pan))
            lines.append(_row(f"VISA {pan}", _money(total)))
        else:
            lines.append(_row(f"VISA ************{pan[-4:]}", _money(total)))
    if step.email:
        email = f"rig.customer{rng.randrange(10**6):06d}@example.com"
        ids.append(("email", email))
        lines.append(f"Receipt sent to {email}")
    if step.phone:
        phone = f"+1 555-01{rng.randrange(100):02d} {rng.randrange(10**4):04d}"
        ids.append(("phone", phone))
        lines.append(f"Delivery contact: {phone}")
    lines += ["", "Thank you!".center(WIDTH), ""]
    return Printed("\n".join(lines), tuple(ids))


def line_bytes(p: Printed) -> bytes:
    """Plain text lines, the receipt ended by a form feed (framing `lines`)."""
    return p.text.encode("utf-8") + b"\n\x0c"


def escpos_bytes(p: Printed) -> bytes:
    """What a till sends its ESC/POS printer for this receipt (framing `escpos`)."""
    from escpos.printer import Dummy

    printer = Dummy()
    printer.set(align="left")
    printer.text(p.text + "\n")
    printer.cut()
    out: bytes = printer.output
    return out
