// BatleHub web UI: copy buttons on install commands, usage lines and new tokens. Everything else
// works without JavaScript; this file is the only script a page loads (the CSP allows no other).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const block of document.querySelectorAll("pre.copyable")) {
    const wrap = document.createElement("div");
    wrap.className = "copy-wrap";
    block.replaceWith(wrap);
    wrap.appendChild(block);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-button";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy: " + block.textContent.trim().slice(0, 80));
    button.addEventListener("click", async () => {
      const text = block.textContent.trim();
      const written = navigator.clipboard
        ? navigator.clipboard.writeText(text).then(() => true, () => false)
        : Promise.resolve(false);
      // A browser that neither writes nor refuses (no focus, no permission) must not leave the
      // button hanging: after a second the text is selected for the user to copy.
      const copied = await Promise.race([written, new Promise((done) => setTimeout(() => done(false), 1000))]);
      if (!copied) {
        const range = document.createRange();
        range.selectNodeContents(block);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
      }
      button.textContent = copied ? "Copied" : "Selected: press Ctrl+C";
      setTimeout(() => { button.textContent = "Copy"; }, 2000);
    });
    wrap.appendChild(button);
  }
});
