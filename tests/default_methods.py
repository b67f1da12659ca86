"""A mild and a harsh setting of every built-in method, for the matrix test (kvpress's tests/default_presses.py is the
pattern). A registered method missing here is still tested, with its defaults."""

SETTINGS = {
    "full": ["full", "full:grow=1"],
    "selfindex": ["selfindex:budget=0.5", "selfindex:budget=0.05,sinks=4,window=4,fixed=scored"],
    "kivi": ["kivi:bits=4", "kivi:bits=2,residual=32"],
    "snapkv": ["snapkv:capacity=0.5", "snapkv:capacity=8,window=4"],
    "streaming": ["streaming:window=64", "streaming:sinks=1,window=4"],
    "h2o": ["h2o:heavy=0.2,recent=0.2", "h2o:heavy=2,recent=2"],
    "tova": ["tova:capacity=0.5", "tova:capacity=4"],
    "pyramidkv": ["pyramidkv:capacity=0.5", "pyramidkv:capacity=8,window=4"],
    "adakv": ["adakv:capacity=0.5", "adakv:capacity=8,window=4,alpha=0"],
    "quest": ["quest:budget=0.5", "quest:budget=16,page=8,dense_layers=0"],
    "doublesparse": ["doublesparse:budget=0.5,channels=32", "doublesparse:budget=4,channels=2"],
    "qjl": ["qjl:bits=512,buffer=64", "qjl:bits=16,initial_bits=16,outliers=2,outlier_bits=8,buffer=8,group=8"],
}


def matrix(names):
    """(id, spec) for every registered name: its two settings, or its defaults."""
    return [(f"{n}-{i}", s) for n in names for i, s in enumerate(SETTINGS.get(n, [n]))]
