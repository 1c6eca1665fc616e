"""The provenance value and every form it is shown in."""

from __future__ import annotations

import logging

from usam.core.provenance import RANDOM_WEIGHTS_TAG, Provenance, report, untrained

UNTRAINED = Provenance(("synthetic embeddings (no SAM)", untrained("SAM (tiny)")))


def test_reasons_merge_in_order_without_repeats():
    merged = UNTRAINED + Provenance((untrained("SAM (tiny)"), untrained("CLIP")))
    assert merged.reasons == (
        "synthetic embeddings (no SAM)",
        "an untrained SAM (tiny)",
        "an untrained CLIP",
    )
    assert UNTRAINED.about("evaluation masks").reasons[0] == (
        "evaluation masks: synthetic embeddings (no SAM)"
    )
    assert Provenance.merged([]) == Provenance() and not Provenance().random_weights


def test_every_form_agrees():
    assert UNTRAINED.scalars("val") == {"val/random_weights": 1.0}
    assert Provenance().scalars("test") == {"test/random_weights": 0.0}
    assert UNTRAINED.tags() == [RANDOM_WEIGHTS_TAG] == ["random-weights"]
    assert Provenance().tags() == []
    assert UNTRAINED.fields() == {
        "meaningful": False,
        "not_meaningful_because": list(UNTRAINED.reasons),
    }
    assert Provenance().note() == ""
    reasons = "synthetic embeddings (no SAM); an untrained SAM (tiny)"
    assert UNTRAINED.note() == f" (RANDOM WEIGHTS: {reasons})"
    banner = UNTRAINED.banner("these numbers are NOT results").splitlines()
    assert banner[1] == "RANDOM WEIGHTS: these numbers are NOT results"
    assert banner[2] == f"because of: {reasons}"
    assert banner[0] == banner[-1] == "=" * 78


def test_report_logs_the_banner_only_when_there_is_a_reason(caplog):
    with caplog.at_level(logging.INFO, logger="usam.core.provenance"):
        report(Provenance(), "NOT results")
        assert not caplog.records
        report(UNTRAINED, "NOT results")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert UNTRAINED.banner("NOT results") in record.getMessage()
