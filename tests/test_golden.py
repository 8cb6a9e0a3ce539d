"""Golden value slices (tests/golden/values.json): a tiny ambient network, the ambient sampler and the ambient loss.

Property tests elsewhere say what these must satisfy; the slices catch any unintended change of the numbers.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL = 1e-5


def load_golden_module():
    spec = importlib.util.spec_from_file_location('make_golden', os.path.join(HERE, 'golden', 'make_golden.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def golden():
    module = load_golden_module()
    with open(module.GOLDEN_VALUES) as f:
        expected = json.load(f)
    # Whatever global RNG state earlier tests left must not matter.
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        torch.rand(7)
        computed = module.golden_values()
    return expected, computed


def test_golden_names(golden):
    expected, computed = golden
    assert sorted(computed) == sorted(expected), 'run `python tests/golden/make_golden.py` after adding a slice'


@pytest.mark.parametrize('name', ['network', 'ambient_heun_sampler', 'ambient_loss'])
def test_golden_values(golden, name):
    expected, computed = golden
    want, got = np.array(expected[name]), np.array(computed[name])
    assert want.shape == got.shape and np.all(np.isfinite(got)), name
    atol = RTOL * np.abs(want).max()  # entries near zero: relative to the slice's scale
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol, err_msg=(
        f'golden slice "{name}" changed. If the change is intended, regenerate the goldens with '
        f'`python tests/golden/make_golden.py` and commit tests/golden/values.json with the reason.'))


def test_golden_values_do_not_depend_on_the_global_rng():
    module = load_golden_module()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        a = module.golden_values()['ambient_loss']
        torch.manual_seed(2)
        b = module.golden_values()['ambient_loss']
    assert a == b
