// The one table renderer of the dashboard. A column is {head, cell, td, th}: head is the header's text (or markup),
// cell(row) the cell's content (escaped unless it is markup), td(row) an optional {attribute: value} map, th an
// optional {attribute: value} map of the header cell (a class that sets the column's width).
import { attrs, html } from "./html.js";

const cellOf = (column, row) => html`<td${attrs(column.td?.(row))}>${column.cell(row)}</td>`;

/** The <tr>s of the rows, for a table's <tbody>. */
export const tableRows = (columns, rows) => rows.map((row) => html`<tr>${columns.map((c) => cellOf(c, row))}</tr>`);

/** A table with a header row; attributes (id, class, data-*) go on the <table>. It scrolls sideways inside its
 * wrapper when it is wider than the page, instead of widening the page. */
export function table({ columns, rows = [], attributes = {} }) {
  const head = (column) => html`<th${attrs(column.th)}>${column.head}</th>`;
  const heads = html`<thead><tr>${columns.map(head)}</tr></thead>`;
  const body = html`<table${attrs(attributes)}>${heads}<tbody>${tableRows(columns, rows)}</tbody></table>`;
  return html`<div class="table-wrap">${body}</div>`;
}
