// Formatting. Every time the page shows is US Eastern: the server sends tsET strings
// (ISO-8601 with the New York offset), which are shown as written, whatever the browser's zone.

/** The UTC offset of a tsET in seconds ("-04:00" is -14400). */
export function offsetSeconds(tsET) {
  const match = /([+-])(\d\d):(\d\d)$/.exec(tsET || "");
  if (!match) return 0;
  const seconds = Number(match[2]) * 3600 + Number(match[3]) * 60;
  return match[1] === "-" ? -seconds : seconds;
}

/** Chart time of a tsET: ET wall-clock seconds (the chart draws its axis in UTC, so shifting
 * by the offset makes the axis read in ET). */
export function chartTime(tsET) {
  return Math.floor(Date.parse(tsET) / 1000) + offsetSeconds(tsET);
}

/** "HH:MM:SS" of a tsET (ET, as written). */
export function etClock(tsET) {
  return tsET ? tsET.slice(11, 19) : "–";
}

export function price(value) {
  return value == null ? "–" : Number(value).toFixed(2);
}

export function money(value) {
  if (value == null) return "–";
  const sign = value < 0 ? "-" : "";
  return `${sign}$${Math.abs(value).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`;
}

export function signed(value, digits = 2) {
  if (value == null) return "–";
  return `${value > 0 ? "+" : ""}${Number(value).toFixed(digits)}`;
}

export function tone(value) {
  return value > 0 ? "buy" : value < 0 ? "sell" : "";
}

/** A duration in ms, short. */
export function duration(ms) {
  if (ms == null) return "–";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 3_600_000) return `${(ms / 60_000).toFixed(1)} min`;
  if (ms < 86_400_000) return `${(ms / 3_600_000).toFixed(1)} h`;
  return `${Math.round(ms / 86_400_000)} d`;
}

export function percent(value) {
  return value == null ? "–" : `${Number(value).toFixed(2)} %`;
}
