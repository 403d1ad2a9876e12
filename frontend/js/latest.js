// Request sequencing: a view that asks again before an earlier answer arrived (a filter changed twice in a row, a
// link followed while a page loads) must not let the slower, older answer overwrite the newer one.

/** Wraps load(current, ...args): each call passes its arguments on, with current() true until a later call of the
 * wrapped function starts; load checks it after each await and draws nothing once it is false. */
export function latestOnly(load) {
  let latest = 0;
  return (...args) => {
    const ticket = ++latest;
    return load(() => ticket === latest, ...args);
  };
}
