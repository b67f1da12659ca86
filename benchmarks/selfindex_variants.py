"""Source variants of csrc/selfindex.cu for benchmarks/selfindex_variants.sh (development tool): each is a list of
(old, new) substitutions; every `old` must occur in the source, so a stale variant fails loudly instead of timing the
unchanged kernel. Usage: python selfindex_variants.py NAME SOURCE DEST"""

import sys

VARIANTS = {
    "base": [],
    # 4 attend blocks an SM (128 registers, a few spilled) instead of 3: a third more warps to hide the gathers
    "attend4": [("__launch_bounds__(kAttWarps * 32, 3) attend_kernel", "__launch_bounds__(kAttWarps * 32, 4) attend_kernel")],
    # 8 tokens in flight per scoring thread instead of 4
    "score8": [("  constexpr int U = 4;\n  using Word", "  constexpr int U = 8;\n  using Word")],
}
VARIANTS["attend4+score8"] = VARIANTS["attend4"] + VARIANTS["score8"]


def main(name: str, src: str, dest: str) -> int:
    text = open(src).read()
    for old, new in VARIANTS[name]:
        if old not in text:
            print(f"variant {name}: {old[:60]!r} not in the source", file=sys.stderr)
            return 1
        text = text.replace(old, new)
    open(dest, "w").write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
