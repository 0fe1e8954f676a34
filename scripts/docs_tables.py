"""Writes a benchmark's results into a documentation page as a Markdown table, with the
command that made it, the date and the machine above it.

    KERAS_BACKEND=jax python benchmarks/bench_attention.py --json attention.json
    python scripts/docs_tables.py attention attention.json \\
        --page docs/benchmarks/attention.md --name attention-jax

    KERAS_BACKEND=jax python benchmarks/bench_generate.py --model infini --json gen.jsonl
    python scripts/docs_tables.py generate gen.jsonl --page docs/benchmarks/generate.md \\
        --name generate-jax

`attention` reads the JSON of `bench_attention.py --json` (its table rows, as the script
prints them); `generate` reads the JSON lines that `bench_generate.py --json` appends (one
run per line, one row each, in file order). The page must contain the lines
`<!-- docs_tables: NAME -->` and `<!-- /docs_tables -->`; what lies between them is
replaced. Without `--page` the block is printed. `--command`, `--date`, `--machine`
override what the JSON recorded.
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _common  # noqa: E402

GENERATE_HEADERS = ["backend", "model", "batch", "prompt", "prefill (s)", "prompt + new (s)",
                    "new tokens/s", "ms per new token", "ms per cache step"]


def attention_table(path):
    import bench_attention

    with open(path) as f:
        payload = json.load(f)
    rope = payload.get("settings", {}).get("rope", False)
    rows = [bench_attention.table_row(rec, rope) for rec in payload["records"]]
    runs = [payload.get("run", {})]
    return _common.markdown_table(bench_attention.TABLE_HEADERS, rows), runs


def generate_table(path):
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    rows = []
    for r in records:
        step = r.get("step")
        rows.append([
            r.get("run", {}).get("backend", "?"), r["model"], r["batch"], r["prompt"],
            f"{r['prefill']:.3f}", f"{r['total']:.3f}",
            f"{r['batch'] / r['per_token']:,.0f}", f"{1000 * r['per_token']:.2f}",
            "-" if step is None else f"{1000 * step:.2f}",
        ])
    return _common.markdown_table(GENERATE_HEADERS, rows), [r.get("run", {}) for r in records]


def provenance(runs, args):
    """The lines above a table: command(s), date(s), machine."""
    def values(key, override):
        if override:
            return [override]
        return list(dict.fromkeys(r[key] for r in runs if r.get(key))) or ["not recorded"]

    commands = values("command", args.command)
    lines = ["Command" + ("s" if len(commands) > 1 else "") + ": "
             + "; ".join(f"`{c}`" for c in commands) + ".",
             f"Date: {', '.join(values('date', args.date))}. "
             f"Machine: {', '.join(values('machine', args.machine))}.",
             f"(Written by `scripts/docs_tables.py {args.kind}`.)"]
    return lines


def render(args):
    table, runs = {"attention": attention_table, "generate": generate_table}[args.kind](
        args.results)
    return provenance(runs, args) + [""] + table


def write(page, name, block):
    with open(page) as f:
        text = f.read()
    pattern = re.compile(
        rf"(^<!-- docs_tables: {re.escape(name)} -->\n).*?(^<!-- /docs_tables -->$)",
        re.S | re.M)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no '<!-- docs_tables: {name} -->' ... "
                         "'<!-- /docs_tables -->' block")
    text = pattern.sub(lambda m: m.group(1) + "\n".join(block) + "\n" + m.group(2), text,
                       count=1)
    with open(page, "w") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("attention", "generate"))
    p.add_argument("results", help="bench_attention JSON or bench_generate JSON lines")
    p.add_argument("--page", help="Markdown page to write into (default: print)")
    p.add_argument("--name", help="name of the docs_tables block in the page")
    p.add_argument("--command")
    p.add_argument("--date")
    p.add_argument("--machine")
    args = p.parse_args(argv)
    block = render(args)
    if args.page:
        if not args.name:
            p.error("--page needs --name")
        write(args.page, args.name, block)
        print(f"wrote {len(block)} lines into {args.page} ({args.name})")
    else:
        print("\n".join(block))
    return block


if __name__ == "__main__":
    main()
