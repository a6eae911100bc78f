"""The two generation bench tasks, made by a seeded generator: same seed, same files.

1. `transactions`: a bank-transaction row -> one sentence in the bank's house style. The
   template is chosen by the row's `type` (debit, credit, fee: the slice); the date is
   written out ("4 March 2024") and amounts get thousands separators. `HOUSE_PATTERN` is a
   regex every house-style sentence fullmatches (the constrained decoder's format). The
   training rows are teacher logs in which a share of the answers (`noise`) are paraphrases
   that drift from the house style ("You paid Acme EUR 12.50 on ..."); they fail the
   pattern, so `data.on_bad_rows: skip` drops and counts them. Validation and gold rows are
   the house-style references, never the teacher's words.
2. `sql`: questions about a small shop -> one SQLite query. The database is built at run time
   from bench/data/shop.sql (4 tables, 100 rows). Questions come from 9 template families
   (the slices), each with 3 paraphrases and slots filled from the database.

`write_task(name, out)` writes `train.jsonl`, `validation.jsonl`, `gold.jsonl` (instruction /
response / slice rows) and a `task.kind: generate` config, `config.yaml`, and returns its path.
Used by bench/generate.py.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DATA = Path(__file__).resolve().parent / "data"
SHOP_SQL = DATA / "shop.sql"
TASKS = ("transactions", "sql")

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
MERCHANTS = (
    "Acme Grocers", "City Rail", "Blue Cafe", "Nordic Energy", "Book Corner", "Green Pharmacy",
    "Metro Fitness", "Harbor Hotel", "Sunny Bakery", "Tech Depot", "River Cinema", "Atlas Insurance",
)  # fmt: skip
EMPLOYERS = ("Northwind Ltd", "Globex", "Initech", "Umbrella Labs")
BANK = "Your Bank"
CURRENCIES = ("EUR", "USD", "GBP")
# Bounded on purpose: every part has a longest form, so a constrained decoder that only ever
# extends a valid prefix reaches the end within max_tokens (an unbounded name lets a model
# repeat "Money Money ..." until it is cut).
_MONEY = r"(?:EUR|USD|GBP) [0-9]{1,3}(?:,[0-9]{3}){0,2}\.[0-9]{2}"
_NAME = r"[A-Z][a-z]{0,14}(?: [A-Z][a-z]{0,14}){0,2}"
_DAY = r"(?:[1-9]|[12][0-9]|3[01]) (?:" + "|".join(MONTHS) + r") 20[0-9]{2}"
HOUSE_PATTERN = (
    rf"On {_DAY} (?:you paid {_MONEY} to {_NAME}|you received {_MONEY} from {_NAME}|{_NAME} charged a fee of {_MONEY})"
    rf"; your balance is -?{_MONEY}\."
)
TRANSACTIONS_INSTRUCTION = "Write the bank transaction as one sentence in the bank's house style."
SQL_INSTRUCTION = (
    "Write one SQLite query that answers the question. Tables: customers(id, name, city, joined), "
    "products(id, name, category, price), orders(id, customer_id, order_date, status), "
    "order_items(order_id, product_id, quantity)."
)


@dataclass(frozen=True)
class Row:
    text: str
    answer: str
    slice: str
    teacher: str = ""  # the teacher's answer (house style, or a paraphrase)

    def as_json(self, answer: str | None = None) -> dict[str, str]:
        return {"instruction": self.text, "response": self.answer if answer is None else answer, "slice": self.slice}


def money(amount: float, currency: str) -> str:
    sign = "-" if amount < 0 else ""
    return f"{sign}{currency} {abs(amount):,.2f}"


def long_date(iso: str) -> str:
    year, month, day = iso.split("-")
    return f"{int(day)} {MONTHS[int(month) - 1]} {year}"


# ---------------------------------------------------------------- 1. transactions


def transaction(rng: random.Random) -> dict[str, Any]:
    kind = rng.choices(("debit", "credit", "fee"), weights=(6, 3, 1))[0]
    amount = {"debit": rng.uniform(2, 400), "credit": rng.uniform(50, 4000), "fee": rng.uniform(0.5, 15)}[kind]
    party = {"debit": rng.choice(MERCHANTS), "credit": rng.choice(EMPLOYERS), "fee": BANK}[kind]
    return {
        "date": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "type": kind,
        "party": party,
        "amount": round(amount, 2),
        "currency": rng.choice(CURRENCIES),
        "balance": round(rng.uniform(-300, 9000), 2),
    }


def house_sentence(t: dict[str, Any]) -> str:
    amount, day = money(t["amount"], t["currency"]), long_date(t["date"])
    what = {
        "debit": f"you paid {amount} to {t['party']}",
        "credit": f"you received {amount} from {t['party']}",
        "fee": f"{t['party']} charged a fee of {amount}",
    }[t["type"]]
    return f"On {day} {what}; your balance is {money(t['balance'], t['currency'])}."


PARAPHRASES: tuple[Callable[[dict[str, Any]], str], ...] = (
    lambda t: f"You paid {t['party']} {money(t['amount'], t['currency'])} on {long_date(t['date'])}.",
    lambda t: (
        f"{t['type'].title()} of {t['amount']} {t['currency']} ({t['party']}, {t['date']}). Balance: {t['balance']}."
    ),
    lambda t: f"On {t['date']}, {money(t['amount'], t['currency'])} went {'out' if t['type'] != 'credit' else 'in'}.",
)


def transaction_text(t: dict[str, Any]) -> str:
    return " | ".join(f"{k}: {v}" for k, v in t.items())


def transaction_rows(n: int, seed: int, noise: float = 0.0) -> list[Row]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        t = transaction(rng)
        house = house_sentence(t)
        teacher = rng.choice(PARAPHRASES)(t) if rng.random() < noise else house
        rows.append(Row(transaction_text(t), house, t["type"], teacher))
    return rows


# ---------------------------------------------------------------- 2. text-to-SQL


def build_shop(path: Path) -> Path:
    """bench/data/shop.sql as a SQLite file at `path` (rebuilt from scratch)."""
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(SHOP_SQL.read_text(encoding="utf-8"))
    conn.commit()
    conn.close()
    return path


def _column(db: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute(sql)]
    finally:
        conn.close()


# family -> (paraphrases, SQL, slot name); {v} is the slot's value.
SQL_FAMILIES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "count_city": (
        ("How many customers live in {v}?", "Count the customers from {v}.", "What is the number of customers in {v}?"),
        "SELECT count(*) FROM customers WHERE city = '{v}'",
        "city",
    ),
    "cheaper_than": (
        (
            "Which products cost less than {v}?",
            "List the products priced under {v}.",
            "Show products cheaper than {v}.",
        ),
        "SELECT name FROM products WHERE price < {v}",
        "price",
    ),
    "in_category": (
        ("List the {v} products.", "Which products are in the {v} category?", "Show all {v} products."),
        "SELECT name FROM products WHERE category = '{v}'",
        "category",
    ),
    "priciest_in_category": (
        (
            "What is the most expensive {v} product?",
            "Which {v} product costs the most?",
            "Name the priciest {v} product.",
        ),
        "SELECT name FROM products WHERE category = '{v}' ORDER BY price DESC LIMIT 1",
        "category",
    ),
    "average_price": (
        (
            "What is the average price of {v} products?",
            "Average price in the {v} category?",
            "How much do {v} products cost on average?",
        ),
        "SELECT avg(price) FROM products WHERE category = '{v}'",
        "category",
    ),
    "orders_by_customer": (
        ("How many orders has {v} placed?", "Count the orders of {v}.", "What is the number of orders placed by {v}?"),
        "SELECT count(*) FROM orders JOIN customers ON orders.customer_id = customers.id WHERE customers.name = '{v}'",
        "customer",
    ),
    "orders_with_status": (
        ("How many orders are {v}?", "Count the {v} orders.", "What is the number of orders with status {v}?"),
        "SELECT count(*) FROM orders WHERE status = '{v}'",
        "status",
    ),
    "joined_in_year": (
        (
            "Which customers joined in {v}?",
            "List the customers who signed up in {v}.",
            "Name the customers that joined in {v}.",
        ),
        "SELECT name FROM customers WHERE substr(joined, 1, 4) = '{v}'",
        "year",
    ),
    "units_of_product": (
        (
            "How many units of {v} were ordered in total?",
            "Total quantity ordered of {v}?",
            "How many {v} units were sold?",
        ),
        "SELECT sum(quantity) FROM order_items JOIN products ON order_items.product_id = products.id "
        "WHERE products.name = '{v}'",
        "product",
    ),
}


def slot_values(db: Path) -> dict[str, list[Any]]:
    return {
        "city": _column(db, "SELECT DISTINCT city FROM customers ORDER BY city"),
        "price": [10, 20, 30, 50, 80, 100],
        "category": _column(db, "SELECT DISTINCT category FROM products ORDER BY category"),
        "customer": _column(db, "SELECT name FROM customers ORDER BY id"),
        "status": _column(db, "SELECT DISTINCT status FROM orders ORDER BY status"),
        "year": _column(db, "SELECT DISTINCT substr(joined, 1, 4) FROM customers ORDER BY 1"),
        "product": _column(db, "SELECT name FROM products ORDER BY id"),
    }


def sql_rows(db: Path) -> list[Row]:
    """Every (family, paraphrase, slot value) question with its gold SQL, in a fixed order."""
    values = slot_values(db)
    return [
        Row(question.format(v=v), sql.format(v=v), family)
        for family, (questions, sql, slot) in SQL_FAMILIES.items()
        for v in values[slot]
        for question in questions
    ]


# ---------------------------------------------------------------- files


def split(rows: list[Row], n_val: int, n_gold: int, seed: int) -> tuple[list[Row], list[Row], list[Row]]:
    """A seeded random split into train, validation and gold rows."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    gold = [rows[i] for i in order[:n_gold]]
    val = [rows[i] for i in order[n_gold : n_gold + n_val]]
    train = [rows[i] for i in order[n_gold + n_val :]]
    return train, val, gold


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_config(name: str, out: Path, database: Path | None) -> dict[str, Any]:
    if name == "transactions":
        task: dict[str, Any] = {
            "kind": "generate",
            "name": "transactions",
            "instruction": TRANSACTIONS_INSTRUCTION,
            "output": {"format": "regex", "pattern": HOUSE_PATTERN, "max_tokens": 96},
        }
    else:
        task = {
            "kind": "generate",
            "name": "shop-sql",
            "instruction": SQL_INSTRUCTION,
            "output": {"format": "sql", "max_tokens": 80},
            "sql": {"database": str(database)},
        }
    return {
        "task": task,
        # Teacher logs: answers that drift from the house style fail the format and are skipped, counted.
        "data": {
            "train": [str(out / "train.jsonl")],
            "validation": [str(out / "validation.jsonl")],
            "on_bad_rows": "skip",
        },
        "run_dir": str(out / "run"),
    }


def write_task(
    name: str, out: Path, *, n: int = 600, n_val: int = 40, n_gold: int = 60, noise: float = 0.25, seed: int = 0
) -> Path:
    """Write the task's train/validation/gold JSONL and config.yaml under `out`; returns the config path."""
    out.mkdir(parents=True, exist_ok=True)
    database = None
    if name == "transactions":
        rows = transaction_rows(n, seed, noise)
    elif name == "sql":
        database = build_shop(out / "shop.sqlite")
        rows = sql_rows(database)
    else:
        raise ValueError(f"unknown task {name!r}: one of {TASKS}")
    train, val, gold = split(rows, n_val, n_gold, seed)
    write_jsonl(out / "train.jsonl", (r.as_json(r.teacher or r.answer) for r in train))
    write_jsonl(out / "validation.jsonl", (r.as_json() for r in val))
    write_jsonl(out / "gold.jsonl", (r.as_json() for r in gold))
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(task_config(name, out, database), sort_keys=False), encoding="utf-8")
    return config
