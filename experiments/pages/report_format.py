"""Number and label formatting shared by the report's section renderers (report_sections,
report_ablation): kept apart so that neither imports the other's helpers."""

import math


def fmt(x, digits=3):
    """``x`` to ``digits`` significant digits; "n/a" for None or NaN, "∞" for infinity."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}g}"


def cell_name(cell):
    """The prose name of a registered cell ("rnn" -> "tanh RNN"), from the cell registry."""
    from charrnn import cells
    try:
        return cells.get(cell).name
    except cells.CellError:
        return cell


def by(table, cell, opt):
    """The rows of an ablation table for one (cell, optimizer)."""
    return [r for r in table if r["cell"] == cell and r["optimizer"] == opt]


def multiple(label):
    """A threshold label's multiple (or absolute τ); inf for 'none'."""
    if label == "none":
        return math.inf
    return float(label[:-1]) if label.endswith("x") else float(label)
