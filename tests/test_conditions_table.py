"""Polygon's stocks condition table: packaged data, frozen lookups and the combination rule."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from libs.common.market import conditions_table as ct
from libs.common.market.conditions_table import UpdateRule

# The team's shared reference sample (outside the repo); TICKMESH_CONDITIONS_SAMPLE overrides.
SAMPLE = Path(
    os.environ.get(
        "TICKMESH_CONDITIONS_SAMPLE",
        Path(__file__).resolve().parents[2] / "shared/reference/polygon-conditions-sample.json",
    )
)

# Known, documented differences from the shared sample (see libs/common/data/README.md): the
# full fetch also maps FINRA_TDDS for these two conditions; the sample predates that.
SAMPLE_SIP_ADDITIONS = {2: {"FINRA_TDDS": "W"}, 7: {"FINRA_TDDS": "C"}}

YES = UpdateRule(True, True, True)
VOLUME_ONLY = UpdateRule(False, False, True)


@pytest.fixture(scope="module")
def table() -> dict:
    return json.loads(ct.data_file().read_text(encoding="utf-8"))


def _trade_rows(table: dict) -> list[dict]:
    return [row for row in table["results"] if "trade" in row["data_types"]]


def test_packaged_table_loads_with_every_row_polygon_lists(table: dict) -> None:
    rows = table["results"]
    assert table["status"] == "OK"
    assert table["count"] == len(rows) == 94
    kinds = Counter(row["type"] for row in rows)
    assert kinds["sale_condition"] == 40
    assert kinds["quote_condition"] == 33
    assert kinds["trade_thru_exempt"] == 1
    assert all(row["asset_class"] == "stocks" for row in rows)


def test_trade_condition_ids_are_unique(table: dict) -> None:
    ids = [row["id"] for row in _trade_rows(table)]
    assert len(ids) == len(set(ids)) == 55
    assert set(ct.polygon_rules()) == set(ids) == set(ct.condition_names())


def test_quote_rows_may_reuse_ids_but_never_enter_the_trade_lookup(table: dict) -> None:
    quote_41 = [r for r in table["results"] if r["id"] == 41 and "trade" not in r["data_types"]]
    assert [r["name"] for r in quote_41] == ["Cash Only Settlement"]
    assert ct.condition_names()[41] == "Trade Thru Exempt"


def test_every_row_says_where_its_rule_comes_from(table: dict) -> None:
    for row in table["results"]:
        source = row["source"]
        if "trade" not in row["data_types"]:
            assert source.startswith("none:") and "update_rules" not in row
        elif row["type"] in ("short_sale_restriction_indicator", "financial_status_indicator"):
            assert source.startswith("inferred:")
        else:
            assert source.startswith("Polygon conditions API")


def test_every_trade_row_has_both_kinds_of_boolean_rules(table: dict) -> None:
    for row in _trade_rows(table):
        for kind in ct.KINDS:
            flags = row["update_rules"][kind]
            assert set(flags) == {"updates_high_low", "updates_open_close", "updates_volume"}
            assert all(isinstance(v, bool) for v in flags.values())


@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"shared sample not present at {SAMPLE}")
def test_every_sample_entry_is_in_the_table_and_agrees(table: dict) -> None:
    sample = json.loads(SAMPLE.read_text(encoding="utf-8"))["results"]
    assert len(sample) == 10
    ours = {(row["id"], row["type"]): row for row in table["results"]}
    for entry in sample:
        row = ours[(entry["id"], entry["type"])]
        for field, value in entry.items():
            if field == "sip_mapping":
                expected = {**value, **SAMPLE_SIP_ADDITIONS.get(entry["id"], {})}
                assert row["sip_mapping"] == expected, entry["id"]
            else:
                assert row[field] == value, (entry["id"], field)
        assert row.get("legacy", False) == entry.get("legacy", False)


def test_average_price_trade_counts_volume_only() -> None:
    assert ct.condition_names()[2] == "Average Price Trade"
    assert ct.polygon_rules()[2] == VOLUME_ONLY


def test_intermarket_sweep_updates_everything() -> None:
    assert ct.condition_names()[14] == "Intermarket Sweep"
    assert ct.polygon_rules()[14] == YES


def test_odd_lot_counts_volume_but_sets_no_price_in_consolidated_bars() -> None:
    assert ct.condition_names()[37] == "Odd Lot Trade"
    assert ct.polygon_rules("consolidated")[37] == VOLUME_ONLY


def test_form_t_and_late_extended_hours_count_volume_only() -> None:
    assert ct.condition_names()[12] == "Form T/Extended Hours"
    assert ct.polygon_rules()[12] == VOLUME_ONLY
    assert ct.polygon_rules()[13] == VOLUME_ONLY


def test_out_of_sequence_and_derivatively_priced_set_high_low_but_not_open_close() -> None:
    for cid in (10, 22, 32):
        assert ct.polygon_rules()[cid] == UpdateRule(True, False, True), cid


def test_official_open_and_close_are_not_trades_in_consolidated_bars() -> None:
    nothing = UpdateRule(False, False, False)
    assert ct.polygon_rules()[15] == nothing
    assert ct.polygon_rules()[16] == nothing
    assert ct.polygon_rules("market_center")[15] == UpdateRule(True, True, False)


def test_corrected_consolidated_close_sets_prices_but_adds_no_volume() -> None:
    assert ct.polygon_rules()[38] == UpdateRule(True, True, False)
    assert ct.polygon_rules("market_center")[38] == UpdateRule(False, False, False)


def test_status_indicators_are_neutral() -> None:
    for cid in (*range(57, 61), *range(62, 72)):
        assert ct.polygon_rules()[cid] == YES, cid


def test_lookups_are_read_only_and_built_once() -> None:
    rules = ct.polygon_rules()
    assert rules is ct.polygon_rules("consolidated")
    with pytest.raises(TypeError):
        rules[2] = YES  # type: ignore[index]
    with pytest.raises(TypeError):
        ct.condition_names()[2] = "x"  # type: ignore[index]


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        ct.polygon_rules("participant")


def test_a_trade_without_conditions_updates_everything() -> None:
    assert ct.combine_rules([]) == ct.Combined(YES, ())


def test_a_trade_updates_a_field_only_if_all_its_conditions_allow_it() -> None:
    # Intermarket Sweep (all) + Odd Lot (volume only): the odd lot's "no" wins.
    assert ct.combine_rules([14, 37]).rule == VOLUME_ONLY
    # Sold out of sequence (high/low, volume) + Intermarket Sweep: no open/close.
    assert ct.combine_rules((14, 32)).rule == UpdateRule(True, False, True)
    # Corrected close (no volume) + Average price (no prices): nothing at all.
    assert ct.combine_rules([38, 2]).rule == UpdateRule(False, False, False)
    # Order does not matter.
    assert ct.combine_rules([37, 14]) == ct.combine_rules([14, 37])


def test_market_center_rules_combine_the_same_way() -> None:
    assert ct.combine_rules([15], "market_center").rule == UpdateRule(True, True, False)
    assert ct.combine_rules([15, 37], "market_center").rule == UpdateRule(False, False, False)


def test_unknown_ids_restrict_nothing_and_are_reported_not_raised() -> None:
    combined = ct.combine_rules([999, 14, 1000])
    assert combined.rule == YES
    assert combined.unknown == (999, 1000)
    assert ct.combine_rules([999, 37]) == ct.Combined(VOLUME_ONLY, (999,))
    assert ct.UNKNOWN_CONDITION_RULE == YES


def test_ignored_ids_are_skipped_entirely() -> None:
    form_t = ct.FORM_T_EXTENDED_HOURS
    assert ct.combine_rules([form_t]).rule == VOLUME_ONLY
    assert ct.combine_rules([form_t], ignore={form_t}).rule == YES
    assert ct.combine_rules([form_t, 37], ignore=[form_t]).rule == VOLUME_ONLY
    assert ct.combine_rules([999], ignore={999}).unknown == ()


def test_combine_accepts_any_iterable_of_ids() -> None:
    assert ct.combine_rules(iter([14, 37])).rule == VOLUME_ONLY
