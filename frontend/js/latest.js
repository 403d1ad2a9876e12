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

/** latestOnly for a part of a page (a table, a plot, a picker): each call's first argument is the page's current()
 * from the router, and load's current() is also false once that page is no longer the one shown. The part finds its
 * elements by id, and the page followed (another run's) has elements of the same ids: an answer that arrives late
 * would be drawn there. */
export const latestOnPage = (load) => latestOnly((mine, page, ...args) => load(() => mine() && page(), ...args));
