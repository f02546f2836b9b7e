"""Choosing a kernel's implementation: the one rule behind every dispatcher in this package.

quantized_attention, quest_attention, quest_select and column_sums each name their
implementations in an `IMPLEMENTATIONS` tuple and take `implementation=None` to mean "pick":
a Pallas kernel on the backend it was written for when it can run the input, else the plain-JAX
reference (each module's `auto` rule says which). A name outside the tuple, or a kernel asked
for by name that cannot run the input, is a `UserError` that says what to change; an explicit
choice never falls back silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pallas_kernels.errors import UserError

# None: the implementation can run the input; else the message of the UserError it raises.
Refusal = Callable[[], "str | None"]


def cannot_run(kernel: str, why: str | None, *, suggest_reference: bool = True) -> str | None:
    """The refusal of `kernel` ("Pallas", "TPU", ...) for reason `why`; None where `why` is None."""
    if why is None:
        return None
    hint = "; use implementation='reference'" if suggest_reference else ""
    return f"the {kernel} kernel cannot run this input ({why}){hint}"


def choose_implementation(
    implementation: str | None,
    implementations: tuple[str, ...],
    *,
    auto: Callable[[], str],
    refusals: Mapping[str, Refusal],
) -> str:
    """The implementation to run: `implementation`, or `auto()` where it is None.

    Raises UserError if the name is not one of `implementations`, or if the chosen
    implementation's entry in `refusals` (checked only for the one chosen) returns a message.
    """
    impl = auto() if implementation is None else implementation
    if impl not in implementations:
        raise UserError(f"implementation must be one of {implementations}, got {impl!r}")
    refusal = refusals.get(impl)
    if refusal is not None and (message := refusal()) is not None:
        raise UserError(message)
    return impl
