// ESLint 9 flat config for the dashboard: native ES modules run by the browser, no build step.
import js from "@eslint/js";
import globals from "globals";

export default [
  { ignores: ["**/node_modules/"] },
  js.configs.recommended,
  {
    files: ["**/*.js"],
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: "module",
      // Plotly comes from /static/plotly.min.js, a classic script loaded before the modules.
      globals: { ...globals.browser, Plotly: "readonly" },
    },
    rules: {
      "max-len": ["error", { code: 120, ignoreUrls: true }],
      "max-lines-per-function": ["error", { max: 40, skipBlankLines: true, skipComments: true }],
      complexity: ["error", 10],
      "no-unused-vars": ["error", { argsIgnorePattern: "^_" }],
      "no-var": "error",
      "prefer-const": "error",
      eqeqeq: ["error", "always", { null: "ignore" }],
      "no-restricted-properties": [
        "error",
        { property: "innerHTML", message: "Use render(element, html`...`) from html.js: it escapes what it inserts." },
        { property: "outerHTML", message: "Use render(element, html`...`) from html.js." },
      ],
      "no-restricted-syntax": [
        "error",
        {
          selector: "CallExpression[callee.property.name='insertAdjacentHTML']",
          message: "Use render(element, html`...`) from html.js.",
        },
      ],
    },
  },
  {
    // The one place that writes markup into the page.
    files: ["**/js/html.js"],
    rules: { "no-restricted-properties": "off" },
  },
  {
    files: ["eslint.config.js"],
    languageOptions: { globals: globals.node },
  },
];
