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
      try {
        await navigator.clipboard.writeText(text);
      } catch {
        // No clipboard access (an insecure origin): select the text for the user to copy.
        const range = document.createRange();
        range.selectNodeContents(block);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
      }
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
    wrap.appendChild(button);
  }
});
