// A virtualised table: only the rows in view (plus a little overscan) exist in
// the DOM, so 10,000 rows scroll as smoothly as 10.  Rows are plain objects;
// columns say how to turn one into a cell.  Used by the Network, Processes and
// Connections views.
//
// A click on a column's header sorts by it (ascending, descending, then the
// rows' own order again), as in the browser's own DevTools.  A column's
// `sort(row)` gives the key (a number or a string); without one its shown
// text is compared, with numbers inside it compared as numbers.
//
// A column is `width` px wide, or with `flex` it shares the room left over in
// proportion to its `width`, down to `min` px (its `width` without one): the
// table fits a 1280 px window before it scrolls sideways.

import { h, clear } from "./dom.js";

const OVERSCAN = 8;
const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

const isEmpty = (k) => k == null || k === "" || Number.isNaN(k);

function compareKeys(a, b) {
  if (typeof a === "number" && typeof b === "number") return a - b;
  return collator.compare(String(a), String(b));
}

export class VirtualTable {
  constructor({ columns, rowHeight = 22, testid, rowTestid = "row", rowKey, rowClass, onSelect, onOpen, onClose, onContextMenu, emptyText }) {
    this.columns = columns;
    this.rowHeight = rowHeight;
    this.rowKey = rowKey;
    this.rowClass = rowClass || (() => "");
    this.rowTestid = rowTestid;
    this.onSelect = onSelect || (() => {});
    this.onOpen = onOpen || (() => {});
    this.onClose = onClose || (() => {});
    this.onContextMenu = onContextMenu;
    this.emptyText = emptyText || (() => "No rows");
    this.rows = []; // as shown: the caller's rows, sorted when a column is
    this.source = []; // the caller's rows, in their own order
    this.sortKey = null; // the column key sorted by, or null
    this.sortDir = 1; // 1 ascending, -1 descending
    this.selected = null;
    this.rendered = new Map(); // row -> element currently in the DOM
    this.pending = false;

    this.head = h("div", { class: "vt-head", role: "row" });
    this.canvas = h("div", { class: "vt-canvas", role: "rowgroup" });
    this.empty = h("div", { class: "vt-empty", testid: `${testid}-empty` });
    this.el = h("div", { class: "vt", tabindex: "0", role: "grid", testid, "aria-rowcount": "0" }, this.head, this.canvas, this.empty);
    this.buildHead();
    this.applyWidths();

    this.el.addEventListener("scroll", () => this.schedule(), { passive: true });
    this.el.addEventListener("keydown", (e) => this.onKey(e));
    this.canvas.addEventListener("click", (e) => {
      const row = this.rowAt(e.target);
      if (row) {
        this.select(row, { reveal: false });
        this.onOpen(row);
      }
    });
    if (this.onContextMenu) {
      this.canvas.addEventListener("contextmenu", (e) => {
        const row = this.rowAt(e.target);
        if (!row) return;
        e.preventDefault();
        this.select(row, { reveal: false });
        this.onContextMenu(row, e);
      });
    }
    new ResizeObserver(() => this.schedule()).observe(this.el);
  }

  buildHead() {
    this.columns.forEach((col, i) => {
      const grip = h("span", { class: "vt-grip", "aria-hidden": "true" });
      grip.addEventListener("pointerdown", (e) => this.startResize(e, i));
      const numeric = (col.cls || "").split(" ").includes("num") ? "num" : "";
      const th = h("div", { class: `vt-th ${numeric}`, role: "columnheader", title: `${col.title || col.label} (click to sort)`,
                            testid: `col-${col.key}`, "aria-sort": "none" }, col.label, grip);
      th.addEventListener("click", (e) => { if (e.target !== grip) this.cycleSort(col.key); });
      this.head.append(th);
    });
  }

  // Header clicks: ascending, descending, unsorted.
  cycleSort(key) {
    if (this.sortKey !== key) this.setSort(key, 1);
    else if (this.sortDir === 1) this.setSort(key, -1);
    else this.setSort(null, 1);
  }

  setSort(key, dir = 1) {
    this.sortKey = this.columns.some((c) => c.key === key) ? key : null;
    this.sortDir = dir;
    this.columns.forEach((col, i) => {
      const on = col.key === this.sortKey;
      const th = this.head.children[i];
      th.setAttribute("aria-sort", on ? (dir === 1 ? "ascending" : "descending") : "none");
      th.classList.toggle("sorted", on);
      th.classList.toggle("desc", on && dir === -1);
    });
    this.setRows(this.source);
    if (this.selected) this.reveal(this.indexOf(this.selected));
    // Sorted: from its first rows (the view had followed the newest at the
    // bottom, so the smallest looked missing); unsorted: following again.
    else this.el.scrollTop = this.sortKey ? 0 : this.el.scrollHeight;
  }

  sorted(rows) {
    const col = this.columns.find((c) => c.key === this.sortKey);
    if (!col) return rows;
    const keyOf = col.sort || col.value || (() => null);
    const dir = this.sortDir;
    // Keys once per row, then a stable sort: equal keys keep the rows' order.
    const keyed = rows.map((row, i) => ({ row, i, k: keyOf(row) }));
    keyed.sort((a, b) => {
      const empty = isEmpty(a.k) - isEmpty(b.k); // empty cells last, either way
      return empty || (isEmpty(a.k) ? 0 : compareKeys(a.k, b.k) * dir) || a.i - b.i;
    });
    return keyed.map((x) => x.row);
  }

  applyWidths() {
    const least = (c) => (c.flex ? c.min || c.width : c.width);
    const tpl = this.columns.map((c) => (c.flex ? `minmax(${least(c)}px, ${c.width / 100}fr)` : `${c.width}px`)).join(" ");
    const min = this.columns.reduce((sum, c) => sum + least(c), 0);
    this.el.style.setProperty("--vt-cols", tpl);
    this.el.style.setProperty("--vt-min", `${min}px`);
  }

  startResize(e, i) {
    e.preventDefault();
    e.stopPropagation();
    const col = this.columns[i];
    const cell = this.head.children[i];
    const startX = e.clientX;
    const startW = cell.getBoundingClientRect().width;
    const move = (ev) => {
      col.width = Math.max(28, Math.round(startW + ev.clientX - startX));
      col.flex = false;
      this.applyWidths();
    };
    const up = () => {
      window.removeEventListener("pointermove", move);
      window.removeEventListener("pointerup", up);
    };
    window.addEventListener("pointermove", move);
    window.addEventListener("pointerup", up);
  }

  rowAt(target) {
    const el = target.closest(".vt-row");
    return el ? el.__row : null;
  }

  // The rows to show (the caller owns the array).  `removedFromTop` rows were
  // dropped from the start since the last call: the view shifts by as much, so
  // the row the user is reading stays where it is.
  setRows(rows, { removedFromTop = 0 } = {}) {
    // Sorted, new rows land anywhere: the view stays where the user put it.
    const follow = !this.sortKey && this.isAtBottom();
    this.source = rows;
    this.rows = this.sortKey ? this.sorted(rows) : rows;
    if (this.sortKey) removedFromTop = 0;
    this.canvas.style.height = `${rows.length * this.rowHeight}px`;
    this.el.setAttribute("aria-rowcount", String(rows.length));
    if (follow) {
      this.el.scrollTop = this.el.scrollHeight;
    } else if (removedFromTop) {
      this.el.scrollTop = Math.max(0, this.el.scrollTop - removedFromTop * this.rowHeight);
    }
    this.schedule();
  }

  isAtBottom() {
    const el = this.el;
    return el.scrollHeight - el.clientHeight - el.scrollTop < this.rowHeight * 1.5;
  }

  indexOf(row) {
    // Rows are in time order, and most lookups are for recent rows.
    const rows = this.rows;
    for (let i = rows.length - 1; i >= 0; i -= 1) if (rows[i] === row) return i;
    return -1;
  }

  select(row, { reveal = true } = {}) {
    this.selected = row;
    if (row && reveal) this.reveal(this.indexOf(row));
    this.schedule();
    this.onSelect(row);
  }

  reveal(index) {
    if (index < 0) return;
    // Scroll coordinates include the sticky header above the rows.
    const top = index * this.rowHeight;
    const headH = this.head.offsetHeight;
    const el = this.el;
    if (top < el.scrollTop) el.scrollTop = top;
    else if (headH + top + this.rowHeight > el.scrollTop + el.clientHeight) {
      el.scrollTop = headH + top + this.rowHeight - el.clientHeight;
    }
  }

  onKey(e) {
    if (e.target !== this.el) return;
    const n = this.rows.length;
    if (!n) return;
    const page = Math.max(1, Math.floor((this.el.clientHeight - this.head.offsetHeight) / this.rowHeight) - 1);
    let index = this.selected ? this.indexOf(this.selected) : -1;
    switch (e.key) {
      case "ArrowDown": index = Math.min(n - 1, index + 1); break;
      case "ArrowUp": index = index < 0 ? n - 1 : Math.max(0, index - 1); break;
      case "PageDown": index = Math.min(n - 1, index + page); break;
      case "PageUp": index = Math.max(0, index - page); break;
      case "Home": index = 0; break;
      case "End": index = n - 1; break;
      case "Enter":
        if (this.selected) this.onOpen(this.selected);
        e.preventDefault();
        return;
      case "Escape":
        this.onClose();
        e.preventDefault();
        return;
      default:
        return;
    }
    e.preventDefault();
    this.select(this.rows[index]);
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.render();
    });
  }

  refresh(row) {
    // A row object changed in place (a connection got its bytes): redraw it.
    const el = this.rendered.get(row);
    if (el) {
      el.remove();
      this.rendered.delete(row);
    }
    this.schedule();
  }

  refreshAll() {
    for (const el of this.rendered.values()) el.remove();
    this.rendered.clear();
    this.schedule();
  }

  render() {
    const rows = this.rows;
    const rh = this.rowHeight;
    this.empty.hidden = rows.length > 0;
    if (!rows.length) this.empty.textContent = this.emptyText();
    const scrollTop = Math.max(0, this.el.scrollTop);
    const view = this.el.clientHeight;
    const first = Math.max(0, Math.floor(scrollTop / rh) - OVERSCAN);
    const last = Math.min(rows.length, Math.ceil((scrollTop + view) / rh) + OVERSCAN);
    const keep = new Map();
    for (let i = first; i < last; i += 1) {
      const row = rows[i];
      let el = this.rendered.get(row);
      if (!el) el = this.buildRow(row);
      el.style.transform = `translateY(${i * rh}px)`;
      el.setAttribute("aria-rowindex", String(i + 1));
      el.classList.toggle("selected", row === this.selected);
      el.setAttribute("aria-selected", String(row === this.selected));
      el.classList.toggle("odd", i % 2 === 1);
      keep.set(row, el);
      if (!el.isConnected) this.canvas.append(el);
    }
    for (const [row, el] of this.rendered) if (!keep.has(row)) el.remove();
    this.rendered = keep;
  }

  buildRow(row) {
    const el = h("div", { class: `vt-row ${this.rowClass(row)}`, role: "row", testid: this.rowTestid });
    el.__row = row;
    if (this.rowKey) el.dataset.key = this.rowKey(row);
    for (const col of this.columns) {
      const cell = h("div", { class: `vt-td ${col.cls || ""}`, role: "gridcell" });
      if (col.render) col.render(row, cell);
      else {
        const text = col.value(row);
        cell.textContent = text;
        if (text) cell.title = text;
      }
      el.append(cell);
    }
    return el;
  }

  clear() {
    this.rows = [];
    this.source = []; // as shown: the caller's rows, sorted when a column is
    this.source = []; // the caller's rows, in their own order
    this.sortKey = null; // the column key sorted by, or null
    this.sortDir = 1; // 1 ascending, -1 descending
    this.selected = null;
    clear(this.canvas);
    this.rendered.clear();
    this.canvas.style.height = "0px";
    this.schedule();
  }
}
