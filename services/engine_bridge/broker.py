"""The paper broker: fills at the bar close, stop and target exits, cash and PnL accounting.

Pure and synchronous: it works on a ``BrokerState`` (which the bridge persists) and never
reads a clock. Rules (``docs/engine_bridge.md`` has the long form):

- An order fills at the close of its symbol's bar in the current minute, moved against us by
  ``slippage_bps``; commission is ``commission_per_share`` × shares, at least ``commission_min``.
- Stops and targets are checked on every later bar of the symbol, before the engine sees it:
  a bar that opens through the level fills at the open, otherwise at the level; when one bar
  touches both, the stop wins (the conservative reading of a bar we cannot see inside).
- Cash pays for longs; a buy larger than the cash is cut to what the cash allows. Shorts (only
  with ``allow_short``) are not margin-checked.
- ``realizedPnl`` is net of every commission, so ``equity = initial cash + realized +
  unrealized`` holds exactly.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from msgspec import Meta, Struct

from libs.common.market.sessions import bar_id
from libs.common.runtime.settings import SettingsGroup
from libs.common.schemas import Bar
from services.engine_bridge.model import BrokerState, Order, PositionState


class BrokerConfig(SettingsGroup, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How the paper broker sizes, fills and charges (the ``BRIDGE_*`` broker settings)."""

    initial_cash: Annotated[float, Meta(gt=0, description="starting cash of the portfolio")] = (
        100_000.0
    )
    sizing: Annotated[
        Literal["shares", "notional"], Meta(description="fixed share count or fixed dollars")
    ] = "shares"
    shares_per_trade: Annotated[int, Meta(gt=0, description="sizing=shares: shares per entry")] = (
        100
    )
    notional_per_trade: Annotated[
        float, Meta(gt=0, description="sizing=notional: dollars per entry")
    ] = 10_000.0
    slippage_bps: Annotated[
        float, Meta(ge=0, description="fill price moved against us, in bps")
    ] = 1.0
    commission_per_share: Annotated[float, Meta(ge=0, description="commission per share")] = 0.005
    commission_min: Annotated[float, Meta(ge=0, description="minimum commission per fill")] = 0.0
    stop_pct: Annotated[float, Meta(ge=0, description="stop distance from entry, % (0: none)")] = (
        0.5
    )
    target_pct: Annotated[
        float, Meta(ge=0, description="target distance from entry, % (0: none)")
    ] = 1.0
    allow_short: Annotated[bool, Meta(description="let a SELL open or grow a short position")] = (
        False
    )


class Fill(Struct, frozen=True):
    """One executed fill."""

    symbol: str
    action: str
    shares: int
    price: float
    reason: str
    stopPrice: float | None
    targetPrice: float | None
    realizedPnl: float
    commission: float


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


class PaperBroker:
    """Executes orders and exits against a ``BrokerState`` it mutates in place."""

    def __init__(self, config: BrokerConfig, state: BrokerState | None = None) -> None:
        self.config = config
        self.state = state if state is not None else BrokerState(cash=config.initial_cash)

    # -- prices ------------------------------------------------------------------------------

    def fill_price(self, raw: float, buying: bool) -> float:
        """``raw`` moved against us by the slippage, rounded to 1/10000."""
        factor = self.config.slippage_bps / 10_000.0
        return round(raw * (1 + factor) if buying else raw * (1 - factor), 4)

    def commission(self, shares: int) -> float:
        """Commission of a fill of ``shares``."""
        return round(max(self.config.commission_min, self.config.commission_per_share * shares), 4)

    def entry_size(self, price: float) -> int:
        """Shares of a new position at ``price``, per the sizing setting."""
        if self.config.sizing == "notional":
            return int(self.config.notional_per_trade // price) if price > 0 else 0
        return self.config.shares_per_trade

    def levels(self, price: float, long: bool) -> tuple[float | None, float | None]:
        """Stop and target of a new position entered at ``price``."""
        stop_pct = self.config.stop_pct / 100.0
        target_pct = self.config.target_pct / 100.0
        direction = 1 if long else -1
        stop = round(price * (1 - direction * stop_pct), 4) if stop_pct > 0 else None
        target = round(price * (1 + direction * target_pct), 4) if target_pct > 0 else None
        return stop, target

    # -- views -------------------------------------------------------------------------------

    def position(self, symbol: str) -> PositionState | None:
        """The open position of ``symbol``, if any."""
        return self.state.positions.get(symbol)

    def unrealized(self) -> float:
        """Unrealized PnL of every open position at its last price."""
        return sum((p.lastPrice - p.entryPrice) * p.shares for p in self.state.positions.values())

    def market_value(self) -> float:
        """Signed market value of the open positions."""
        return sum(p.lastPrice * p.shares for p in self.state.positions.values())

    def exposure(self) -> float:
        """Gross market value (|shares| × last price) of the open positions, in dollars."""
        return sum(abs(p.shares) * p.lastPrice for p in self.state.positions.values())

    def equity(self) -> float:
        """Cash plus the signed market value."""
        return self.state.cash + self.market_value()

    # -- bar events --------------------------------------------------------------------------

    def check_exits(self, bar: Bar) -> list[Fill]:
        """Stop or target exit of a position entered before ``bar``."""
        position = self.state.positions.get(bar.symbol)
        if position is None or position.entryMs >= bar.startMs:
            return []
        stop, target = position.stopPrice, position.targetPrice
        raw: float | None = None
        reason = ""
        if position.shares > 0:
            if stop is not None and bar.open <= stop:
                raw, reason = bar.open, "stop"
            elif target is not None and bar.open >= target:
                raw, reason = bar.open, "target"
            elif stop is not None and bar.low <= stop:
                raw, reason = stop, "stop"
            elif target is not None and bar.high >= target:
                raw, reason = target, "target"
        else:
            if stop is not None and bar.open >= stop:
                raw, reason = bar.open, "stop"
            elif target is not None and bar.open <= target:
                raw, reason = bar.open, "target"
            elif stop is not None and bar.high >= stop:
                raw, reason = stop, "stop"
            elif target is not None and bar.low <= target:
                raw, reason = target, "target"
        if raw is None:
            return []
        price = self.fill_price(raw, position.shares < 0)
        return [self._apply(bar.symbol, bar.startMs, -position.shares, price, bar.close, reason)]

    def mark(self, bar: Bar) -> None:
        """Mark a position with ``bar``: last price, and one more bar held after the entry."""
        position = self.state.positions.get(bar.symbol)
        if position is None:
            return
        if position.entryMs < bar.startMs:
            position.barsHeld += 1
        position.lastPrice = bar.close

    def remark(self, symbol: str, price: float) -> None:
        """Set the last price of a position (a correction of the newest bar)."""
        position = self.state.positions.get(symbol)
        if position is not None:
            position.lastPrice = price

    def execute(self, order: Order, bar: Bar) -> tuple[list[Fill], str, bool]:
        """Fill ``order`` at ``bar``'s close.

        Returns the fills, a note when nothing or less than asked was done, and whether the
        order was rejected (a direction order that is already satisfied is not rejected, just
        a no-op).
        """
        position = self.state.positions.get(order.symbol)
        current = position.shares if position is not None else 0
        buying = order.action == "BUY"
        price = self.fill_price(bar.close, buying)
        note = ""
        if order.shares is not None:
            if order.shares <= 0:
                return [], "shares must be positive", True
            delta = order.shares if buying else -order.shares
            if not buying and not self.config.allow_short and current + delta < 0:
                if current <= 0:
                    return [], "no long position to sell (shorting not allowed)", True
                delta, note = -current, "cut to the position (shorting not allowed)"
        elif buying:
            if current > 0:
                return [], "already long", False
            delta = -current + self.entry_size(price)
        else:
            if current < 0:
                return [], "already short", False
            if current == 0 and not self.config.allow_short:
                return [], "flat already (shorting not allowed)", False
            delta = -current - (self.entry_size(price) if self.config.allow_short else 0)
        if delta > 0:
            opening = delta - max(0, -current)  # shares that add long exposure
            if opening > 0:
                cover_cost = max(0, -current) * price + self.commission(delta)
                affordable = math.floor((self.state.cash - cover_cost) / price) if price else 0
                if affordable < opening:
                    opening = max(0, affordable)
                    delta = max(0, -current) + opening
                    note = "cut to the cash"
        if delta == 0:
            return [], note or "nothing to do", bool(note)
        fill = self._apply(
            order.symbol,
            bar.startMs,
            delta,
            price,
            bar.close,
            order.reason,
            order.stopPrice,
            order.targetPrice,
        )
        return [fill], note, False

    def close(self, symbol: str, minute_ms: int, reason: str, bar: Bar | None = None) -> list[Fill]:
        """Close ``symbol``'s position at ``bar``'s close, or at its last price without a bar."""
        position = self.state.positions.get(symbol)
        if position is None:
            return []
        raw = bar.close if bar is not None else position.lastPrice
        price = self.fill_price(raw, position.shares < 0)
        return [self._apply(symbol, minute_ms, -position.shares, price, raw, reason)]

    def book(
        self,
        symbol: str,
        minute_ms: int,
        action: str,
        shares: int,
        price: float,
        mark_price: float,
        reason: str,
        stop: float | None,
        target: float | None,
        commission: float,
    ) -> Fill:
        """Book a fill that happened elsewhere (a replayed trade), exactly as given."""
        delta = shares if action == "BUY" else -shares
        return self._apply(
            symbol, minute_ms, delta, price, mark_price, reason, stop, target, commission
        )

    # -- accounting --------------------------------------------------------------------------

    def _apply(
        self,
        symbol: str,
        minute_ms: int,
        delta: int,
        price: float,
        mark_price: float,
        reason: str,
        stop: float | None = None,
        target: float | None = None,
        commission: float | None = None,
    ) -> Fill:
        """Book a fill of ``delta`` shares (signed) at ``price`` (slippage included)."""
        state = self.state
        shares = abs(delta)
        if commission is None:
            commission = self.commission(shares)
        position = state.positions.get(symbol)
        current = position.shares if position is not None else 0
        realized = 0.0
        if position is not None and _sign(current) != _sign(delta):
            closing = min(shares, abs(current))
            realized = (price - position.entryPrice) * closing * _sign(current)
            shown_stop, shown_target = position.stopPrice, position.targetPrice
            remaining = current + delta
            if remaining == 0:
                del state.positions[symbol]
            elif _sign(remaining) == _sign(current):
                position.shares = remaining
            else:
                shown_stop, shown_target = self._open(
                    symbol, remaining, price, mark_price, minute_ms, stop, target
                )
        elif position is not None:
            total = current + delta
            position.entryPrice = (position.entryPrice * abs(current) + price * shares) / abs(total)
            position.shares = total
            position.lastPrice = mark_price
            shown_stop, shown_target = position.stopPrice, position.targetPrice
        else:
            shown_stop, shown_target = self._open(
                symbol, delta, price, mark_price, minute_ms, stop, target
            )
        state.cash -= delta * price + commission
        state.realizedPnl += realized - commission
        state.commissions += commission
        state.fills += 1
        return Fill(
            symbol=symbol,
            action="BUY" if delta > 0 else "SELL",
            shares=shares,
            price=price,
            reason=reason,
            stopPrice=shown_stop,
            targetPrice=shown_target,
            realizedPnl=realized - commission,
            commission=commission,
        )

    def _open(
        self,
        symbol: str,
        shares: int,
        price: float,
        mark_price: float,
        minute_ms: int,
        stop: float | None,
        target: float | None,
    ) -> tuple[float | None, float | None]:
        default_stop, default_target = self.levels(price, shares > 0)
        stop = default_stop if stop is None else stop
        target = default_target if target is None else target
        self.state.positions[symbol] = PositionState(
            symbol=symbol,
            shares=shares,
            entryPrice=price,
            entryMs=minute_ms,
            entryBarId=bar_id(minute_ms),
            barsHeld=0,
            lastPrice=mark_price,
            stopPrice=stop,
            targetPrice=target,
        )
        return stop, target
