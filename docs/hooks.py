"""MkDocs hooks of the documentation site.

- The op table is written from `torch_ar.supported_ops()` at build time, so
  the page cannot drift from the engine's table (the page holds the marker);
  the variants table likewise from `torch_ar.VARIANTS`.
- The committed figures under `results/figures/` are served as they are, so
  a page links `results/figures/<name>.png` without a copy in `docs/`.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
OP_TABLE_MARKER = "<!-- op-table -->"
VARIANTS_MARKER = "<!-- variants-table -->"
FIGURES = "results/figures"


def op_table_markdown() -> str:
    """The engine's op table as a Markdown table, one row per autograd node."""
    import torch_ar

    rows = ["| autograd node | op | role | VJP |", "|---|---|---|---|"]
    for op in torch_ar.supported_ops():
        role = op.role + (", activation" if op.activation else "")
        vjp = "specialised" if op.specialised else "generic"
        if op.backward_weight:
            vjp += ", takes psi"
        if op.fused_update:
            vjp += ", fused update"
        rows.append(f"| {op.node} | {op.op} | {role} | {vjp} |")
    return "\n".join(rows)


def variants_markdown() -> str:
    """`torch_ar.VARIANTS` as a Markdown table, one row per variant."""
    import torch_ar

    rows = [
        "| variant | backward weights (psi) | f' in relaxation | psi from W's signs | what it does |",
        "|---|---|---|---|---|",
    ]
    for v in torch_ar.VARIANTS.values():
        dropped = "dropped" if v.drop_activation_derivative else "kept"
        rows.append(
            f"| `{v.name}` | {v.backward_weights} | {dropped} | {v.sign_feedback or '-'} "
            f"| {v.summary} |"
        )
    return "\n".join(rows)


def on_files(files, config):
    for png in sorted((ROOT / FIGURES).glob("*.png")):
        uri = f"{FIGURES}/{png.name}"
        files.append(File(uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if OP_TABLE_MARKER in markdown:
        markdown = markdown.replace(OP_TABLE_MARKER, op_table_markdown())
    if VARIANTS_MARKER in markdown:
        markdown = markdown.replace(VARIANTS_MARKER, variants_markdown())
    return markdown
