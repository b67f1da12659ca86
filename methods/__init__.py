"""Built-in methods, one file each. Importing this package registers them."""

from kvbench.methods import adakv  # noqa: F401
from kvbench.methods import doublesparse  # noqa: F401
from kvbench.methods import full  # noqa: F401
from kvbench.methods import h2o  # noqa: F401
from kvbench.methods import kivi  # noqa: F401
from kvbench.methods import pyramidkv  # noqa: F401
from kvbench.methods import qjl  # noqa: F401
from kvbench.methods import quest  # noqa: F401
from kvbench.methods import selfindex  # noqa: F401
from kvbench.methods import snapkv  # noqa: F401
from kvbench.methods import streaming  # noqa: F401
from kvbench.methods import tova  # noqa: F401
