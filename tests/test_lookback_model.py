"""A model of the triton kernels' decoupled look-back under adversarial scheduling (pure Python).

Each program of the model is a generator that yields every memory operation it makes, in the
order ``kpo_rs/backends/_triton_kernels.py`` makes them (``_next_tile``'s ticket, ``_state_carry``,
``_count_carry`` and ``_nearest_inclusive``): a ticket from an atomic counter, its aggregate stored
then its flag set to 1 with a release (``_publish``: store, barrier, release exchange), or at once
its inclusive value and flag 2 when the tile holds a reset; then, when it needs a carry, the walk:
acquire polls of a window of ``W`` flags (tiles ``k`` back to ``k - W + 1``, tile 0 standing in
for places before it; the lanes of one window read in a random order, each at its own moment),
stopping at the window's nearest 2 when no 0 is in front of it, moving back ``W`` tiles when all
are 1, polling the window again otherwise; then loads of the values behind the flags (a window of
maps at a time, lanes in a random order); last its own inclusive value (flag 2) when due
(``PUBLISH``). States apply the maps after the state found one by one in time order
(``carry = a * carry + b``); counts add the aggregates after the inclusive count found.

Memory: a plain store goes to its program's buffer and reaches memory at a moment the scheduler
picks (late, in any order); a release first drains its program's buffer; acquire polls and the
loads after them read memory. The scheduler keeps fewer programs resident than the grid holds
(a new one starts when one ends) and picks which runs next at random or adversarially (the newest
first, the oldest only when it has waited a bounded number of steps: a fair but hostile
scheduler). The tests check progress (every schedule ends), the results against a sequential
chain (bitwise, floats) for windows of 1, 4 and 16 flags, and that three negative controls fail:
without tickets programs deadlock, without a release a reader sees an unwritten value, and so does
a walk that stops at a window's nearest inclusive value without waiting for the tiles in front.
"""

from __future__ import annotations

import random

import pytest

UNWRITTEN = None


class Memory:
    """Global memory with per-program store buffers (see the module docstring)."""

    def __init__(self, rng: random.Random):
        self.cells: dict = {}
        self.pending: dict[int, list] = {}
        self.rng = rng

    def store(self, pid: int, addr, value) -> None:
        self.pending.setdefault(pid, []).append((addr, value))

    def drain(self, pid: int) -> None:
        for addr, value in self.pending.pop(pid, []):
            self.cells[addr] = value

    def leak(self) -> None:
        """Some buffered store (of any program, in any order) reaches memory."""
        owners = [pid for pid, stores in self.pending.items() if stores]
        if owners:
            stores = self.pending[self.rng.choice(owners)]
            addr, value = stores.pop(self.rng.randrange(len(stores)))
            self.cells[addr] = value

    def load(self, addr):
        return self.cells.get(addr, UNWRITTEN)


def tile_program(tiles, results, *, kind: str, publish: int, tickets: bool, release: bool, pid,
                 window: int = 1, wait_front: bool = True):  # fmt: skip
    """One program, as the kernels' ``_state_carry`` (``kind="state"``) or ``_count_carry``
    (``"count"``). ``tiles[j] = (a, b, need)``: the tile's map ``x -> a x + b`` (a count: ``a``
    0 where the tile holds a reset, else 1; ``b`` its steps) and whether it needs a carry;
    ``window``: the flags polled per round trip; ``wait_front=False`` (a negative control) stops
    at a window's nearest 2 even with unpublished tiles in front of it."""
    if tickets:
        j = yield ("ticket",)
    else:
        j = pid
    a, b, need = tiles[j]
    lanes = random.Random(f"{pid}-{j}")  # the order in which a window's lanes read

    def publish_value(slot, value, flag):
        yield ("store", slot, value)
        yield ("release" if release else "relaxed", ("flag", j), flag)

    def shuffled(n):
        order = list(range(n))
        lanes.shuffle(order)
        return order

    if a == 0:
        yield from publish_value(("inc", j), b, 2)
    else:
        yield ("store", ("agg_a", j), a)
        yield from publish_value(("agg_b", j), b, 1)
    carry = 0 if kind == "count" else 0.0
    if need:
        # _nearest_inclusive: the nearest 2 with every tile after it published
        k, s = j - 1, max(j - 1, 0)
        while k >= 0:
            flags = [0] * window
            for lane in shuffled(window):
                flags[lane] = yield ("acquire", ("flag", max(k - lane, 0)))
            n2 = next((w for w in range(window) if flags[w] == 2), window)
            n0 = next((w for w in range(window) if flags[w] == 0), window)
            if n2 < (n0 if wait_front else window):
                s, k = k - n2, -1
            elif n0 == window:
                k -= window
        carry = yield ("load", ("inc", s))
        for m in range(s + 1, j, window):  # a window of values at a time
            ahead = range(m, min(m + window, j))
            pa, pb = {}, {}
            for lane in shuffled(len(ahead)):
                if kind == "state":
                    pa[lane] = yield ("load", ("agg_a", ahead[lane]))
                pb[lane] = yield ("load", ("agg_b", ahead[lane]))
            for lane in range(len(ahead)):  # applied in time order
                carry = pa[lane] * carry + pb[lane] if kind == "state" else carry + pb[lane]
    due = publish == 1 or (publish > 1 and j % publish == 0)
    if a != 0 and due:
        yield from publish_value(("inc", j), a * carry + b if kind == "state" else b + carry, 2)
    results[j] = carry


def run(tiles, *, kind="state", publish=1, resident=3, order="random", seed=0, tickets=True,
        release=True, window=1, wait_front=True, max_steps=200_000):  # fmt: skip
    """Runs the grid (one program per tile) under the scheduler; returns the carries, or raises
    ``TimeoutError`` after ``max_steps`` (no progress) or ``AssertionError`` on a read of an
    unwritten value."""
    rng = random.Random(seed)
    mem = Memory(rng)
    results: dict[int, object] = {}
    n = len(tiles)
    launch = list(range(n)) if order != "reverse launch" else list(reversed(range(n)))
    running: list[list] = []  # [pid, generator, value to send, steps waited]
    ticket = 0
    steps = 0
    while launch or running:
        while launch and len(running) < resident:
            pid = launch.pop(0)
            gen = tile_program(tiles, results, kind=kind, publish=publish, tickets=tickets,
                               release=release, pid=pid, window=window,
                               wait_front=wait_front)  # fmt: skip
            running.append([pid, gen, None, 0])
        steps += 1
        if steps > max_steps:
            raise TimeoutError("no progress")
        if rng.random() < 0.3:
            mem.leak()
        if order == "random":
            slot = rng.randrange(len(running))
        else:  # the newest first, unless one has waited 8 steps
            starved = [s for s, r in enumerate(running) if r[3] >= 8]
            slot = starved[0] if starved else len(running) - 1
        for r in running:
            r[3] += 1
        entry = running[slot]
        entry[3] = 0
        pid, gen, send, _ = entry
        try:
            op = gen.send(send)
        except StopIteration:
            mem.drain(pid)
            running.pop(slot)
            continue
        if op[0] == "ticket":
            entry[2], ticket = ticket, ticket + 1
        elif op[0] == "store":
            mem.store(pid, op[1], op[2])
            entry[2] = None
        elif op[0] in ("release", "relaxed"):
            if op[0] == "release":
                mem.drain(pid)
            mem.cells[op[1]] = op[2]
            entry[2] = None
        else:  # acquire poll or a load after one
            value = mem.load(op[1])
            assert op[0] == "acquire" or value is not UNWRITTEN, f"read of unwritten {op[1]}"
            entry[2] = 0 if value is UNWRITTEN else value
    return [results[j] for j in range(n)]


def random_tiles(rng: random.Random, n: int, kind: str):
    """Tile 0 holds a reset (position 0 starts a row); the others at random, about one in four.
    ``need`` as the kernels compute it: the tile's first position does not start a row."""
    tiles = []
    for j in range(n):
        reset = j == 0 or rng.random() < 0.25
        starts_row = j == 0 or (reset and rng.random() < 0.5)
        if kind == "count":
            tiles.append((0 if reset else 1, rng.randrange(0, 9), not starts_row))
        else:
            a = 0.0 if reset else rng.uniform(0.1, 1.0)
            tiles.append((a, rng.uniform(-2.0, 2.0), not starts_row))
    return tiles


def chain(tiles, kind: str):
    """The carries a chain of tiles gives, one after another: the specification."""
    carries, state = [], None
    for a, b, need in tiles:
        carry = (0 if kind == "count" else 0.0) if not need else state
        carries.append(carry)
        state = (a * carry + b) if kind == "state" else (b + carry if a else b)
    return carries


@pytest.mark.parametrize("kind", ["state", "count"])
@pytest.mark.parametrize("publish", [1, 0, 3])
@pytest.mark.parametrize("order", ["random", "adversarial"])
@pytest.mark.parametrize("window", [1, 4, 16])
def test_look_back_progresses_and_gives_the_chain(kind, publish, order, window):
    """Grids of 1 to 40 tiles, 1 to 6 programs resident, many schedules, windows of 1, 4 and 16
    flags: every schedule ends, and every tile's carry is bitwise the chain's (so the same on
    every schedule and window)."""
    rng = random.Random(f"{kind}-{publish}-{order}-{window}")  # a string seed: stable
    for trial in range(40):
        tiles = random_tiles(rng, rng.randint(1, 40), kind)
        want = chain(tiles, kind)
        for seed in range(3):
            got = run(tiles, kind=kind, publish=publish, resident=rng.randint(1, 6),
                      order=order, seed=1000 * trial + seed, window=window)  # fmt: skip
            assert got == want, (trial, seed)


def test_without_tickets_programs_deadlock():
    """Negative control: programs taking their program id as tile, launched newest first with
    fewer resident than the grid, wait for tiles that never start; the model sees no progress."""
    rng = random.Random(5)
    tiles = [(0.0, 1.0, False)] + [(0.5, 1.0, True) for _ in range(11)]
    with pytest.raises(TimeoutError):
        run(tiles, resident=3, order="reverse launch", tickets=False, seed=1,
            max_steps=20_000)  # fmt: skip
    assert run(tiles, resident=3, order="random", seed=rng.randrange(100)) == chain(tiles, "state")


def test_without_release_a_reader_sees_an_unwritten_value():
    """Negative control: flags set without a release (the value's store may still sit in its
    program's buffer) let a reader load a slot that was never written, in some schedule."""
    rng = random.Random(9)
    tiles = random_tiles(rng, 30, "state")
    failures = 0
    for seed in range(200):
        try:
            run(tiles, resident=4, order="random", seed=seed, release=False)
        except AssertionError:
            failures += 1
    assert failures > 0


def test_without_waiting_for_the_window_front_a_reader_sees_an_unwritten_value():
    """Negative control: a walk that stops at its window's nearest inclusive value while a tile
    in front of it has not published its aggregate yet loads a map that was never written, in
    some schedule (the kernels poll such a window again)."""
    rng = random.Random(13)
    tiles = [(0.0, 1.0, False)] + [(0.5, rng.uniform(-1, 1), True) for _ in range(23)]
    failures = 0
    for seed in range(200):
        try:
            run(tiles, resident=6, order="random", seed=seed, window=8, wait_front=False)
        except AssertionError:
            failures += 1
    assert failures > 0
    for seed in range(20):  # and waiting, never
        assert run(tiles, resident=6, seed=seed, window=8) == chain(tiles, "state")
