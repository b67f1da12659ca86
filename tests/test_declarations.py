"""A bad method parameter is refused from the methods' declarations (kvbench/declarations.py) without importing the
methods or torch: the stand-ins agree with the real classes, give the same errors, and a bad spec on the command line
or in a comparison file leaves torch unloaded (checked in a fresh interpreter)."""

import subprocess
import sys
import textwrap

import pytest

from kvbench import KVBenchError
from kvbench.declarations import declared, unreadable
from kvbench.registry import _build, available_methods, check_spec, parse_method

BAD = ["selfindex:budget=7x", "selfindex:budget=0", "selfindex:budget=10", "qjl:bits=100", "qjl:buffer=40",
       "doublesparse:calibration=/no/such.json", "doublesparse:channels=7", "kivi:group=3", "kivi:bits=3",
       "snapkv:kernel=2", "pyramidkv:capacity=0", "adakv:alpha=x", "h2o:heavy=-1", "tova:capacity=1.5",
       "quest:page=0", "streaming:window=0", "full:grow=0", "adakv:foo=1", "quest:budget", "nosuch:budget=1"]


def test_every_builtin_has_a_stand_in_with_the_real_parameters():
    real = {name: cls for name, cls in available_methods().items() if cls.__module__.startswith("kvbench.methods.")}
    assert not unreadable and set(declared()) == set(real)
    for name, cls in real.items():
        assert declared()[name].describe() == cls.describe(), name


@pytest.mark.parametrize("spec", BAD)
def test_a_bad_spec_gets_the_error_the_real_class_gives(spec):
    with pytest.raises(KVBenchError) as real:
        parse_method(spec)
    with pytest.raises(KVBenchError) as fast:
        check_spec(spec)
    assert type(fast.value) is type(real.value) and str(fast.value) == str(real.value)


def test_good_specs_pass_and_build_the_same_parameters():
    for spec in ["full", "selfindex:budget=0.1", "qjl:bits=128,outliers=0", "doublesparse:label_bits=16",
                 "h2o:heavy=0.05,recent=0.05", "kivi:bits=4"]:
        check_spec(spec)
        name = spec.partition(":")[0]
        assert _build(spec, declared()[name]).params() == parse_method(spec).params()


NO_TORCH = textwrap.dedent("""
    import sys
    from kvbench.cli import main
    sys.argv = ["kvbench"] + sys.argv[1:]
    try:
        main()
    except SystemExit as e:
        print("exit", e.code)
    print("torch loaded:", "torch" in sys.modules, "transformers loaded:", "transformers" in sys.modules)
""")


@pytest.mark.parametrize("args", [["run", "kernels", "-m", "selfindex:budget=7x"],
                                  ["run", "accuracy", "--quick", "-m", "full", "-m", "snapkv:capacity=0"],
                                  ["compare", "BAD_FILE", "--check"]])
def test_a_bad_spec_fails_without_importing_torch(args, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('quick = true\nmethods = ["full", "kivi:bits=2", "snapkv:capacity=7x"]\n[suites.accuracy]\n')
    args = [str(bad) if a == "BAD_FILE" else a for a in args]
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert "exit 2" in out and "is invalid" in out, out
    assert "torch loaded: False transformers loaded: False" in out, out
