"""Running the checks: :func:`detector_checks`, :func:`check_detector` and :func:`parametrize_with_checks`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..detectors.base import Detector
from ._helpers import (
    DetectorUnderTest,
    ModelSpec,
    _describe,
    _detector_class,
    _Failed,
    _fix_for,
    _hyperparameters_of,
    _resolve_model,
    _Subject,
)
from .checks import ALL_CHECKS, CheckFunction, _applicable_checks

__all__ = ["DetectorCheck", "DetectorCheckError", "check_detector", "detector_checks", "parametrize_with_checks"]


class DetectorCheckError(AssertionError):
    """A detector failed a conformance check.

    Attributes:
        check: the check's name (``"check_higher_is_more_ood"``).
        detector: the detector, as named in messages (``"odin(temperature=10)"``).
        observed: what the check saw.
        fix: how to make the detector pass.
    """

    def __init__(self, check: str, detector: str, observed: str, fix: str) -> None:
        super().__init__(f"{check} failed for detector {detector}: {observed}. How to fix: {fix}")
        self.check, self.detector, self.observed, self.fix = check, detector, observed, fix


@dataclass(frozen=True, eq=False)
class DetectorCheck:
    """One conformance check bound to a detector and a model; call it to run it.

    Attributes:
        name: the check's name (``"check_batch_size_invariance"``).
        detector: the detector as named in messages and test ids.
        description: what the check tests, in one line.
    """

    name: str
    detector: str
    description: str
    _function: CheckFunction = field(repr=False)
    _cls: type[Detector] = field(repr=False)
    _hyperparameters: dict[str, Any] = field(repr=False)
    _model: ModelSpec = field(repr=False)

    def __call__(self) -> None:
        """Run the check.

        Raises:
            DetectorCheckError: the detector fails it; the message names the
                check, the detector, what was observed and how to fix it.
        """
        model, model_name = _resolve_model(self._model)
        label = f"{self.detector} on {model_name}"
        try:
            self._function(_Subject(self._cls, self._hyperparameters, model))
        except _Failed as failure:
            raise DetectorCheckError(self.name, label, failure.observed, failure.fix) from None
        except DetectorCheckError:
            raise
        except Exception as error:
            raise DetectorCheckError(
                self.name, label, f"the detector raised {type(error).__name__}: {error}", _fix_for(error)
            ) from error

    def __str__(self) -> str:
        return f"{self.detector}-{self.name}"


def _check_skip(skip: Mapping[str, str] | None) -> dict[str, str]:
    skip = dict(skip or {})
    unknown = sorted(set(skip) - set(ALL_CHECKS))
    if unknown:
        raise ValueError(f"skip names unknown checks {unknown}; the checks are: {', '.join(ALL_CHECKS)}")
    return skip


def detector_checks(
    detector: DetectorUnderTest,
    *,
    model: ModelSpec = None,
    hyperparameters: Mapping[str, Any] | None = None,
    skip: Mapping[str, str] | None = None,
) -> Iterator[DetectorCheck]:
    """The checks that apply to ``detector``, as callables, selected from its declared requirements.

    Args:
        detector: a Detector class, an instance (its hyperparameters are
            used; it is never fitted or modified), or a registered name.
        model: a timm architecture name the kit builds and trains on its
            digits (default :data:`DEFAULT_ARCHITECTURE`), built when a check
            first runs; or a model of your own taking the kit's images (read
            from its timm data config). Logit detectors separate the kit's
            noise from digits only on a model trained with the noise as
            outlier exposure, as :func:`conformance_model` trains one.
        hyperparameters: for a class or a name, the hyperparameters to check with.
        skip: ``{check_name: reason}`` for checks not to yield.

    Yields:
        :class:`DetectorCheck` objects; ``str(check)`` is a test id.

    Raises:
        ValueError: ``skip`` names a check that does not exist.
    """
    skip = _check_skip(skip)
    cls = _detector_class(detector)
    values = _hyperparameters_of(detector, hyperparameters)
    label = _describe(cls, values)
    requirements = cls(**values).requirements
    for function in _applicable_checks(requirements):
        if function.__name__ not in skip:
            description = (function.__doc__ or "").strip().splitlines()[0]
            yield DetectorCheck(function.__name__, label, description, function, cls, values, model)


def check_detector(
    detector: DetectorUnderTest,
    *,
    model: ModelSpec = None,
    hyperparameters: Mapping[str, Any] | None = None,
    skip: Mapping[str, str] | None = None,
) -> list[str]:
    """Run every applicable conformance check on ``detector``; raise on the first failure.

    ::

        check_detector(MyDetector)
        check_detector("odin", hyperparameters={"temperature": 10}, model="test_vit")

    Args:
        detector: a Detector class, an instance, or a registered name.
        model: a timm architecture name (default :data:`DEFAULT_ARCHITECTURE`)
            or a model, as for :func:`detector_checks`.
        hyperparameters: for a class or a name, the hyperparameters to check with.
        skip: ``{check_name: reason}`` for checks the detector is known to
            fail, with the reason (as scikit-learn's ``expected_failed_checks``).

    Returns:
        The names of the checks that ran, in order.

    Raises:
        DetectorCheckError: a check failed (an ``AssertionError``).
    """
    checks = list(detector_checks(detector, model=model, hyperparameters=hyperparameters, skip=skip))
    for check in checks:
        check()
    return [check.name for check in checks]


def parametrize_with_checks(
    detectors: Sequence[DetectorUnderTest], *, model: ModelSpec = None, skip: Mapping[str, str] | None = None
):
    """A ``pytest.mark.parametrize`` over every check of every detector, with readable ids.

    ::

        @parametrize_with_checks([MyDetector, MyDetector(k=5)])
        def test_conformance(check):
            check()

    Args:
        detectors: Detector classes, instances (for other hyperparameters) or registered names.
        model: as for :func:`check_detector`.
        skip: ``{check_name: reason}``: those checks are reported as skipped, with the reason.

    Returns:
        The parametrize mark, over an argument named ``check``.
    """
    import pytest

    skip = _check_skip(skip)
    params = []
    for detector in detectors:
        for check in detector_checks(detector, model=model):
            marks = [pytest.mark.skip(reason=skip[check.name])] if check.name in skip else []
            params.append(pytest.param(check, id=str(check), marks=marks))
    return pytest.mark.parametrize("check", params)
