"""The examples in the package's docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import sknpeff

# modules that need what this machine may lack (CuPy, a torch.distributed process group)
_NEEDS_MORE = {"sknpeff.backends._cupy", "sknpeff.backends._distributed"}
MODULES = sorted(m.name for m in pkgutil.walk_packages(sknpeff.__path__, "sknpeff.")
                 if m.name not in _NEEDS_MORE and not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):
        if test.examples and test.filename and test.filename.startswith(
                sknpeff.__path__[0]):
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
