// Sorts a table.sortable by the column whose header is clicked: numbers from each cell's
// data-v (an empty one sorts last), else the cell's text; a second click reverses.
(function () {
  function cellKey(row, col, numeric) {
    var cell = row.cells[col];
    if (!numeric) return cell.textContent.trim();
    var v = cell.getAttribute("data-v");
    var x = v === null || v === "" ? NaN : Number(v);
    return isNaN(x) ? null : x;
  }
  function sortTable(table, col, descending) {
    var th = table.tHead.rows[0].cells[col];
    var numeric = th.getAttribute("data-sort") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (row, i) { return [cellKey(row, col, numeric), i, row]; });
    keyed.sort(function (a, b) {
      var x = a[0], y = b[0];
      if (x === y) return a[1] - b[1];
      if (x === null) return 1;
      if (y === null) return -1;
      var c = numeric ? x - y : String(x).localeCompare(String(y), undefined, {numeric: true});
      return (descending ? -c : c) || a[1] - b[1];
    });
    var heads = table.tHead.rows[0].cells;
    for (var h = 0; h < heads.length; h++) heads[h].removeAttribute("aria-sort");
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    var frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k[2]); });
    body.appendChild(frag);
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      if (!th.hasAttribute("data-sort")) return;
      th.addEventListener("click", function () {
        // Numbers first sort largest first (the purest, most KL-moving components).
        var now = th.getAttribute("aria-sort");
        var first = th.getAttribute("data-sort") === "num" && col > 0;
        sortTable(table, col, now ? now === "ascending" : first);
      });
    });
  });
  window.sknpeffSortTable = sortTable;
})();
