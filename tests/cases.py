"""The table of bad and borderline inputs the fault tests share: a row is a `Case` that must either raise a clear
error (its type and the words its message must hold) or succeed, its result checked. Also `output_leaves`, how the
export tests compare a program's outputs with eager's."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch


@dataclass
class Case:
    name: str
    run: Callable[[], object]
    error: type[Exception] | None = None  # the error `run` must raise, or None: `run` must succeed
    words: tuple[str, ...] = ()  # each must appear in the error message
    check: Callable[[object], None] | None = None  # checks what `run` returned


def refused(name: str, run: Callable[[], object], error: type[Exception], *words: str) -> Case:
    return Case(name, run, error=error, words=words)


def works(name: str, run: Callable[[], object], check: Callable[[object], None] | None = None) -> Case:
    return Case(name, run, check=check)


def run_case(case: Case) -> None:
    if case.error is None:
        result = case.run()
        if case.check is not None:
            case.check(result)
        return
    with pytest.raises(case.error) as raised:
        case.run()
    for word in case.words:
        assert word in str(raised.value), f"{word!r} not in: {raised.value}"


def assert_equal(got, expected) -> None:
    assert got == expected, f"{got!r} != {expected!r}"


def case_id(case: Case) -> str:
    return case.name


def output_leaves(output) -> dict[str, torch.Tensor]:
    """The tensors of a model output by name (`hidden_states.3`, ...): what the library's exporter tests compare."""
    leaves = {}
    for name, value in output.items():
        if isinstance(value, torch.Tensor):
            leaves[name] = value
        elif isinstance(value, (tuple, list)):
            leaves.update({f"{name}.{i}": item for i, item in enumerate(value) if isinstance(item, torch.Tensor)})
    return leaves
