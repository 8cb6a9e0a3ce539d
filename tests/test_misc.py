"""Tests for torch_utils/misc.py: InfiniteSampler (against a direct re-statement of the walk), resumption,
per-seed generators, int lists, parameter copying and module summaries."""

import io

import numpy as np
import pytest
import torch

from torch_utils import misc


def reference_walk(num_items, count, seed=0, shuffle=True, window_size=0.5):
    """The sampler's walk written out step by step (scalar randint draws), as EDM describes it."""
    order = np.arange(num_items)
    rng = np.random.RandomState(seed) if shuffle else None
    window = 0
    if shuffle:
        rng.shuffle(order)
        window = int(np.rint(num_items * window_size))
    out = []
    for i in range(count):
        out.append(int(order[i % num_items]))
        if window >= 2:
            j = (i % num_items - rng.randint(window)) % num_items
            order[i % num_items], order[j] = order[j], order[i % num_items]
    return out


def take(sampler, count):
    it = iter(sampler)
    return [next(it) for _ in range(count)]


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks and history, so that block boundaries and the replay path are exercised quickly."""
    monkeypatch.setattr(misc.InfiniteSampler, '_block_size', 8)
    monkeypatch.setattr(misc.InfiniteSampler, '_history_blocks', 3)


@pytest.mark.parametrize('num_items,window_size', [(13, 0.5), (50, 1.0), (7, 0.2)])
def test_sampler_matches_reference_walk(num_items, window_size):
    count = 2 * misc.InfiniteSampler._block_size + 100  # Crosses block boundaries.
    sampler = misc.InfiniteSampler(range(num_items), seed=123, window_size=window_size)
    assert take(sampler, count) == reference_walk(num_items, count, seed=123, window_size=window_size)


def test_sampler_without_shuffle_or_window_repeats_a_permutation():
    n = 11
    plain = take(misc.InfiniteSampler(range(n), shuffle=False), 3 * n)
    assert plain == list(range(n)) * 3
    stream = take(misc.InfiniteSampler(range(n), seed=4, window_size=0.0), 4 * n)
    first = stream[:n]
    assert sorted(first) == list(range(n)) and first != list(range(n))
    assert stream == first * 4


def test_sampler_shuffled_epochs_cover_dataset_roughly_evenly():
    n = 20
    stream = np.array(take(misc.InfiniteSampler(range(n), seed=1), 200 * n))
    counts = np.bincount(stream, minlength=n)
    assert counts.min() > 150 and counts.max() < 250


def test_sampler_seeded_determinism():
    a = take(misc.InfiniteSampler(range(30), seed=7), 100)
    b = take(misc.InfiniteSampler(range(30), seed=7), 100)
    c = take(misc.InfiniteSampler(range(30), seed=8), 100)
    assert a == b and a != c


@pytest.mark.parametrize('num_replicas', [2, 3])
def test_sampler_ranks_partition_the_stream(num_replicas):
    n, per_rank = 17, 40
    single = take(misc.InfiniteSampler(range(n), seed=3), per_rank * num_replicas)
    ranks = [take(misc.InfiniteSampler(range(n), rank=r, num_replicas=num_replicas, seed=3), per_rank)
             for r in range(num_replicas)]
    interleaved = [ranks[i % num_replicas][i // num_replicas] for i in range(per_rank * num_replicas)]
    assert interleaved == single


def test_sampler_new_iter_continues():
    sampler = misc.InfiniteSampler(range(9), seed=2)
    assert take(sampler, 10) + take(sampler, 15) == reference_walk(9, 25, seed=2)


def test_sampler_resume_is_seamless(small_blocks):
    n = 23
    full = take(misc.InfiniteSampler(range(n), seed=5), 87)
    first = misc.InfiniteSampler(range(n), seed=5)
    head = take(first, 37)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = misc.InfiniteSampler(range(n), seed=5)
    resumed.load_state_dict(state)
    assert head + take(resumed, 50) == full


def test_sampler_resume_with_other_replica_count():
    n = 10
    full = reference_walk(n, 60, seed=9)
    first = misc.InfiniteSampler(range(n), seed=9)
    take(first, 20)
    state = first.state_dict()
    continued = []
    for rank in range(2):
        sampler = misc.InfiniteSampler(range(n), rank=rank, num_replicas=2, seed=9)
        sampler.load_state_dict(state)
        continued.append(take(sampler, 20))
    assert [continued[i % 2][i // 2] for i in range(40)] == full[20:60]


@pytest.mark.parametrize('consumed', [0, 5, 61, 137, 150, 160])
def test_sampler_state_at_consumed_position(small_blocks, consumed):
    """A DataLoader runs ahead; the state at the consumer's position resumes exactly after what it used."""
    n = 19
    full = reference_walk(n, 300, seed=11)
    producer = misc.InfiniteSampler(range(n), seed=11, yield_positions=True)
    drawn = take(producer, 160)  # Ahead of the consumer, like a prefetching loader.
    assert [index for index, _ in drawn] == full[:160] and [pos for _, pos in drawn] == list(range(160))
    state = producer.state_dict(position=consumed)

    exact = misc.InfiniteSampler(range(n), seed=11)
    take(exact, consumed)
    assert state == exact.state_dict()  # History keeps positions 136..159: later ones undo swaps, earlier ones replay.

    resumed = misc.InfiniteSampler(range(n), seed=11, yield_positions=True)
    resumed.load_state_dict(state)
    assert take(resumed, 50) == list(zip(full[consumed:consumed + 50], range(consumed, consumed + 50)))


def test_sampler_state_after_load_mid_block(small_blocks):
    n = 13
    full = reference_walk(n, 200, seed=0)
    sampler = misc.InfiniteSampler(range(n), seed=0, start_position=29)
    assert sampler.position == 29 and take(sampler, 10) == full[29:39]
    other = misc.InfiniteSampler(range(n), seed=0)
    other.load_state_dict(sampler.state_dict(position=33))
    take(other, 40)
    for position in (33, 35, 60, 73):  # Inside the reloaded block, in later blocks, and the current position.
        ref = misc.InfiniteSampler(range(n), seed=0, start_position=position)
        assert other.state_dict(position) == ref.state_dict()


def test_sampler_state_errors():
    sampler = misc.InfiniteSampler(range(5), seed=0)
    take(sampler, 3)
    with pytest.raises(ValueError, match='position=-1'):
        sampler.state_dict(position=-1)
    with pytest.raises(ValueError, match='seed'):
        misc.InfiniteSampler(range(5), seed=1).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match='num_items'):
        misc.InfiniteSampler(range(6), seed=0).load_state_dict(sampler.state_dict())


@pytest.mark.parametrize('kwargs,match', [
    (dict(rank=2, num_replicas=2), 'rank'),
    (dict(num_replicas=0), 'num_replicas'),
    (dict(window_size=1.5), 'window_size'),
    (dict(start_position=-1), 'start_position'),
])
def test_sampler_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        misc.InfiniteSampler(range(4), **kwargs)
    with pytest.raises(ValueError, match='non-empty'):
        misc.InfiniteSampler([])


def test_sampler_in_dataloader_with_positions():
    class Keyed(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, key):
            index, position = key
            return torch.tensor([index, position])

    sampler = misc.InfiniteSampler(Keyed(), seed=1, yield_positions=True)
    loader = iter(torch.utils.data.DataLoader(Keyed(), sampler=sampler, batch_size=4))
    batches = torch.cat([next(loader) for _ in range(3)])
    assert batches[:, 0].tolist() == reference_walk(6, 12, seed=1)
    assert batches[:, 1].tolist() == list(range(12))


def test_stacked_random_generator_is_batch_independent():
    both = misc.StackedRandomGenerator('cpu', [3, 5])
    alone = [misc.StackedRandomGenerator(None, [s]) for s in (3, 5)]
    draws_both = [both.randn([2, 4, 3]), both.rand([2, 5]), both.randint(10, size=[2, 6]),
                  both.bernoulli(torch.full([2, 7], 0.5))]
    for k, gen in enumerate(alone):
        draws = [gen.randn([1, 4, 3]), gen.rand([1, 5]), gen.randint(10, size=[1, 6]),
                 gen.bernoulli(torch.full([1, 7], 0.5))]
        for row, single in zip(draws_both, draws):
            assert torch.equal(row[k:k + 1], single)
    assert not torch.equal(draws_both[0][0], draws_both[0][1])
    # Seeds are taken modulo 2**32, as torch generators accept.
    assert torch.equal(misc.StackedRandomGenerator('cpu', [2 ** 32 + 3]).randn([1, 4]),
                       misc.StackedRandomGenerator('cpu', [3]).randn([1, 4]))


def test_stacked_random_generator_like_and_errors():
    gen = misc.StackedRandomGenerator('cpu', [0, 1, 2])
    x = torch.zeros(3, 2, dtype=torch.float64)
    y = gen.randn_like(x)
    assert y.dtype == torch.float64 and y.shape == x.shape
    with pytest.raises(ValueError, match='number of seeds'):
        gen.randn([2, 4])
    with pytest.raises(ValueError, match='at least one seed'):
        misc.StackedRandomGenerator('cpu', [])
    probs = torch.tensor([0.0, 1.0, 0.0])
    assert gen.bernoulli(probs).tolist() == [0.0, 1.0, 0.0]


def test_parse_int_list():
    assert misc.parse_int_list('1,2,5-10') == [1, 2, 5, 6, 7, 8, 9, 10]
    assert misc.parse_int_list('0-0') == [0]
    assert misc.parse_int_list(' 3 , 4-5 ') == [3, 4, 5]
    assert misc.parse_int_list([4, 2]) == [4, 2]
    assert misc.parse_int_list(7) == [7]
    with pytest.raises(ValueError, match="'5-3'"):
        misc.parse_int_list('5-3')
    for junk in ('a', '1,,2', '1-2-3', '', '1.5'):
        with pytest.raises(ValueError, match='Cannot parse'):
            misc.parse_int_list(junk)
    with pytest.raises(ValueError, match='list of integers'):
        misc.parse_int_list([1, 'x'])


def _tiny_net(seed):
    torch.manual_seed(seed)  # Tests may use the global generator; library code never does.
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_copy_params_and_buffers():
    src, dst = _tiny_net(0), _tiny_net(1)
    src[1].running_mean.fill_(0.25)
    copied = misc.copy_params_and_buffers(src, dst, require_all=True)
    assert len(copied) == len(misc.named_params_and_buffers(dst))
    for (name, a), (_, b) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert torch.equal(a, b), name

    # From a state dict saved by a DDP-wrapped model ('module.' prefix) into a fresh model.
    fresh = _tiny_net(2)
    misc.copy_params_and_buffers({f'module.{k}': v for k, v in src.state_dict().items()}, fresh, require_all=True)
    assert torch.equal(fresh[2].weight, src[2].weight)

    partial = {'0.weight': torch.ones(4, 3)}
    assert misc.copy_params_and_buffers(partial, _tiny_net(3)) == ['0.weight']
    with pytest.raises(ValueError, match='0.bias'):
        misc.copy_params_and_buffers(partial, _tiny_net(3), require_all=True)
    with pytest.raises(ValueError, match="'0.weight'"):
        misc.copy_params_and_buffers({'0.weight': torch.ones(5, 3)}, _tiny_net(3))


def test_print_module_summary(capsys):
    net = _tiny_net(0).eval()
    x = torch.randn(5, 3)
    out = misc.print_module_summary(net, [x])
    assert torch.equal(out, net(x))
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in text.strip().splitlines()}
    assert rows['0'][1:] == ['16', '-', '[5,', '4]', 'float32']
    assert rows['1'][1:3] == ['8', '9']  # BatchNorm1d(4): weight+bias; running mean, var, num_batches_tracked.
    assert rows['Total'][1:] == [str(16 + 8 + 10), '9']


def test_ddp_helpers():
    net = _tiny_net(0)
    with torch.no_grad():
        net[0].weight[0, 0] = float('nan')
    misc.check_ddp_consistency(net)  # Single process: rank 0's copy is this one, nan included.
    with misc.ddp_sync(net, sync=False):
        net(torch.randn(4, 3)).sum().backward()
    assert net[2].weight.grad is not None


def test_infinite_sampler_state_ahead_of_the_walk():
    """A rank's walk may lag behind positions owned by other ranks; the state there is still exact."""
    data = range(11)
    lagging = misc.InfiniteSampler(data, seed=4)
    it = iter(lagging)
    [next(it) for _ in range(5)]
    ahead = misc.InfiniteSampler(data, seed=4)
    ahead.load_state_dict(lagging.state_dict(position=9))
    reference = iter(misc.InfiniteSampler(data, seed=4))
    expected = [next(reference) for _ in range(20)][9:]
    it2 = iter(ahead)
    assert [next(it2) for _ in range(11)] == expected
