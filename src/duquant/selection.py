"""Which nn.Linear layers get quantized, and loud errors when the answer is "none".

A layer is selected when its full module name starts with ``config.scope``, matches ``config.include``
(``re.search``) and does not match the exclude regex; or, when ``config.layers`` is given, when it is one of those
names. ``re.search`` rather than ``re.fullmatch`` keeps the openpi DuQuant scripts' regexes (e.g. the fork's
``(?:^|\\.)(norm|ln)(?:\\.|$)`` exclude) meaning what they meant there.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from duquant import registry
from duquant.config import PART_SCOPES, PRESETS, DuQuantConfig


class SelectionError(ValueError):
    """No layer (or the wrong layers) matched; the message says why and how to fix it."""


@dataclass
class Selection:
    names: list[str]
    modules: dict[str, nn.Linear]
    total_linear: int

    def __len__(self) -> int:
        return len(self.names)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def select_layers(model: nn.Module, config: DuQuantConfig, *, allow_empty: bool = False) -> Selection:
    linears = linear_layers(model)
    if config.layers:
        missing = [n for n in config.layers if n not in linears]
        if missing:
            raise SelectionError(
                f"OPENPI_DUQUANT_LAYERS / --layers names {len(missing)} layer(s) that are not nn.Linear modules of "
                f"this model, e.g. {missing[:5]}; {_nearest_hint(missing[0], linears)}")
        names = [n for n in linears if n in set(config.layers)]
    else:
        include = re.compile(config.include)
        exclude = re.compile(config.effective_exclude) if config.effective_exclude else None
        names = [n for n in linears
                 if n.startswith(config.scope) and include.search(n) and not (exclude and exclude.search(n))]
    if not names and not allow_empty:
        raise SelectionError(zero_match_diagnostic(list(linears), config))
    return Selection(names, {n: linears[n] for n in names}, len(linears))


def zero_match_diagnostic(all_names: list[str], config: DuQuantConfig) -> str:
    scope = config.scope
    under_scope = [n for n in all_names if n.startswith(scope)]
    lines = [
        "DuQuant matched 0 Linear layers - refusing to continue with an unquantized model.",
        f"  scope:    {scope!r}",
        f"  include:  {config.include!r}",
        f"  exclude:  {config.effective_exclude!r}",
        f"  the model has {len(all_names)} nn.Linear layers; {len(under_scope)} start with the scope",
        "  first names: " + (", ".join(all_names[:10]) if all_names else "(none: the model has no nn.Linear)"),
    ]
    if scope and not under_scope:
        suggestion = nearest_prefix(scope, all_names)
        if suggestion:
            lines.append(f"  did you mean `{suggestion}`? (set OPENPI_DUQUANT_SCOPE={suggestion} or --scope)")
    elif under_scope:
        lines.append("  layers exist under the scope but the include/exclude regexes removed all of them; "
                     "check OPENPI_DUQUANT_INCLUDE / _EXCLUDE")
    return "\n".join(lines)


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) + "." for i in range(1, len(parts))]


def nearest_prefix(scope: str, names: list[str]) -> str | None:
    """The existing module prefix closest to `scope`: same segments in order, tolerating missing/extra levels."""
    candidates = sorted({p for n in names for p in _prefixes(n)})
    if not candidates:
        return None
    want = [s for s in scope.split(".") if s]

    def score(prefix: str) -> tuple:
        have = [s for s in prefix.split(".") if s]
        # Longest common subsequence of segments, then prefer fewer extra segments, then length similarity.
        lcs = _lcs(want, have)
        return (lcs, -abs(len(have) - len(want)), -abs(len(prefix) - len(scope)))

    best = max(candidates, key=score)
    return best if _lcs(want, [s for s in best.split(".") if s]) > 0 else None


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _nearest_hint(name: str, linears: dict) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(linears), n=1, cutoff=0.5)
    return f"closest existing name: {close[0]}" if close else "list them with `duquant layers --debug`"


# ---- reporting --------------------------------------------------------------------------------------------------

def part_of(name: str) -> str:
    for part, scope in PART_SCOPES.items():
        if name.startswith(scope):
            return part
    return "other"


def part_counts(names) -> dict[str, int]:
    counts = Counter(part_of(n) for n in names)
    return {p: counts.get(p, 0) for p in (*PART_SCOPES, "other")}


def permutation_summary(requested: str, layers: list[tuple[str, int]], block_size: int) -> str:
    """One line from (permutation used, in_features) of the layers that have one, e.g. "permutation: shuffle x8,
    zigzag x2 (2 layers got zigzag instead of shuffle: 1152 channels are 9 blocks of 128, and 9 does not divide
    128)"; "" when no layer has one. Layers that did not get the requested permutation are counted with the
    reason (registry.permutation_fallback): a fallback is never silent."""
    if not layers:
        return ""
    counts: dict[str, int] = {}
    for used, _ in layers:
        counts[used] = counts.get(used, 0) + 1
    line = "permutation: " + ", ".join(f"{k} x{v}" for k, v in counts.items())
    fell = [(used, width) for used, width in layers if used != requested]
    if fell:
        why = dict.fromkeys(registry.permutation_fallback(requested, w, block_size)[1] or f"{w} channels"
                            for _, w in fell)
        line += (f" ({len(fell)} layer{'s' * (len(fell) != 1)} got {'/'.join(sorted({u for u, _ in fell}))} "
                 f"instead of {requested}: "
                 + "; ".join(why) + ")")
    return line


def planned_permutations(selection: Selection, config: DuQuantConfig) -> list[tuple[str, int]]:
    """(permutation, in_features) of every selected layer that will get one: the method takes config.permute
    and the layer's format an online transform; a width the requested permutation cannot take gets its fallback."""
    if not registry.method(config.method).permutes or registry.permutation(config.permute).planner is None:
        return []
    return [(registry.permutation_fallback(config.permute, m.in_features, config.block_size)[0], m.in_features)
            for n, m in selection.modules.items() if config.layer_format_spec(n).online_transform]


def layer_line(name: str, module: nn.Module, config: DuQuantConfig) -> str:
    """One selected layer: shape, format (its ``Format.label()``: what the weights and activations are), transform
    method (a weight-only format such as w4a16 runs none, whatever the method) and, when not rtn, weight rounding."""
    fmt = config.layer_format_spec(name)
    method = config.method if fmt.online_transform else "no transform"
    if method == "duquant":
        used, why = registry.permutation_fallback(config.permute, module.in_features, config.block_size)
        extra = f", block {config.block_size}, permute {used}" + (f" ({config.permute}: {why})" if why else "")
    elif method == "hadamard":
        extra = f", block {config.block_size}"
    else:
        extra = ""
    if config.weight_rounding != "rtn" and fmt.weights.startswith("int"):
        extra += f", {config.weight_rounding} rounding"
    return f"{name}: {module.in_features}\u2192{module.out_features}, {fmt.label()}, {method}{extra}"


def selection_summary(model: nn.Module, selection: Selection, config: DuQuantConfig) -> str:
    counts = part_counts(selection.names)
    lines = [
        f"[duquant] scope={config.scope!r} include={config.include!r} exclude={config.effective_exclude!r}",
        f"[duquant] nn.Linear in model: {selection.total_linear}; selected: {len(selection)}",
        "[duquant] per part: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
    ]
    perm = permutation_summary(config.permute, planned_permutations(selection, config), config.block_size)
    if perm:
        lines.append(f"[duquant] {perm}")
    return "\n".join(lines)


@dataclass
class VerifyResult:
    ok: bool
    lines: list[str]


def verify_selection(selection: Selection, preset: str) -> VerifyResult:
    """Check count and per-block layer kinds against a preset."""
    if preset not in PRESETS:
        raise SelectionError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    lines = [f"preset {p.name}: {p.description}; expected {p.expected} layers"]
    ok = len(selection) == p.expected
    lines.append(f"{'OK ' if ok else 'BAD'} count: matched {len(selection)}, expected {p.expected}")
    if p.kinds:
        blocks: dict[str, list[str]] = {}
        pattern = re.compile(r"^(.*\.layers\.\d+)\.(?:.*\.)?([a-z0-9_]+)$")
        for name in selection.names:
            m = pattern.match(name)
            key, kind = (m.group(1), m.group(2)) if m else ("?", name.rsplit(".", 1)[-1])
            blocks.setdefault(key, []).append(kind)
        bad = [(b, k) for b, k in blocks.items() if tuple(k) != p.kinds]
        kinds_ok = not bad and len(blocks) == p.blocks
        lines.append(f"{'OK ' if kinds_ok else 'BAD'} kinds: {len(blocks)} blocks of {','.join(p.kinds)}"
                     f" (expected {p.blocks})")
        for block, kinds in bad[:5]:
            lines.append(f"    {block}: has {','.join(kinds)}")
        ok = ok and kinds_ok
    return VerifyResult(ok, lines)
