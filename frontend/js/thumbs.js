// What an example is, as shown in the tables: a small image on a canvas, or the start of its text.
import { html } from "./html.js";

/** A table cell's markup: the example's image as a canvas (drawn by drawThumbs), or its text, with its source. */
export function describe(meta, row) {
  if (!meta) return html`<span class="muted">${row.source}</span>`;
  if (meta.image) {
    const [height, width] = meta.image.shape;
    return html`<canvas class="thumb" data-id="${row.example_id}" width="${width}" height="${height}"
      style="width:${width * 3}px" role="img" aria-label="image of example ${row.example_id}"></canvas>`;
  }
  // The cell cuts it with an ellipsis where its column ends; the whole text is in the tooltip and on its page.
  const text = meta.text || "";
  const start = text.length > 240 ? `${text.slice(0, 240)}…` : text;
  return html`<code title="${text}">${start}</code> <span class="muted">${meta.source ?? ""}</span>`;
}

/** Draws an image ({shape: [h, w] or [h, w, channels], base64}) of 8-bit pixels on a canvas. */
export function drawImage(canvas, image) {
  const [h, w] = image.shape;
  const channels = image.shape.length === 3 ? image.shape[2] : 1;
  const bytes = Uint8Array.from(atob(image.base64), (c) => c.charCodeAt(0));
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    const v = bytes.subarray(i * channels, i * channels + channels);
    pixels.data.set(channels >= 3 ? [v[0], v[1], v[2], 255] : [v[0], v[0], v[0], 255], 4 * i);
  }
  ctx.putImageData(pixels, 0, 0);
}

/** Draws the images of the canvases describe() left in container; meta maps example ids to their metadata. */
export function drawThumbs(container, meta) {
  container.querySelectorAll("canvas.thumb").forEach((c) => drawImage(c, meta[c.dataset.id].image));
}
