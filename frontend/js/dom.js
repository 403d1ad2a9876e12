// DOM look-ups shared by the views.

export const byId = (id) => document.getElementById(id);

/** The value of the form control with this id. */
export const valueOf = (id) => byId(id).value;

/** Calls handler on the given event of each element id. */
export function onEach(ids, event, handler) {
  for (const id of ids) byId(id).addEventListener(event, handler);
}
