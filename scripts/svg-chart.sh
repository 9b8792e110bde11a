#!/usr/bin/env bash
# Writes an SVG chart of min/median/max series, for the benchmark scripts: no
# dependency beyond awk, and the SVG is small enough to commit and embed in the
# README.
#
# Usage: scripts/svg-chart.sh OUT.svg TITLE X-TITLE Y-TITLE [lines|bars] < DATA
# DATA: one point per line, tab-separated:
#   SERIES  X  X-LABEL  MIN  MEDIAN  MAX
# lines: one line per series through its medians, X numeric (placed on a log2
#        scale when LOGX=1, as for RAM sizes), a whisker from min to max at each
#        point (the series a few pixels apart); the X-LABELs of the points name
#        the ticks.
# bars:  a group of bars per X-LABEL (in order of first appearance), one bar per
#        series at its median, a whisker from min to max; X is unused.
# The Y axis starts at 0; with LOGY=1 it is logarithmic instead, from the
# power of 10 below the smallest min to the one above the largest max (for
# series that differ tenfold, such as exec's pause and transfer's).
# DASH=REGEX: series whose names match REGEX are drawn dashed, in the colour
# of the series named as they are without the match if there is one (a floor
# beside what it is the floor of).
set -euo pipefail
[[ $# -ge 4 ]] || { echo "usage: $0 OUT.svg TITLE X-TITLE Y-TITLE [lines|bars] < DATA" >&2; exit 2; }
out=$1 title=$2 xtitle=$3 ytitle=$4 kind=${5:-lines}
[[ $kind == lines || $kind == bars ]] || { echo "svg-chart: kind must be lines or bars, not $kind" >&2; exit 2; }

awk -F '\t' -v title="$title" -v xtitle="$xtitle" -v ytitle="$ytitle" \
    -v kind="$kind" -v logx="${LOGX:-0}" -v logy="${LOGY:-0}" -v dash="${DASH:-}" '
function floor10(v,   f) { f = log(v) / log(10); return (f == int(f) || f > 0) ? int(f) : int(f) - 1 }
function esc(s) { gsub(/&/, "\\&amp;", s); gsub(/</, "\\&lt;", s); gsub(/>/, "\\&gt;", s); return s }
# The X of point n in lines mode: the series side by side around the tick, 5 px
# apart, so that their whiskers do not hide each other.
function qx(n) { return px(pxv[n]) + (ps[n] - (ns - 1) / 2) * 5 }
function px(x) { return L + (x - xmin) / (xmax - xmin) * (W - L - R) }
function py(y) {
    if (!logy) return H - B - y / ymax * (H - T - B)
    if (y < ymin) y = ymin
    return H - B - (log(y) - log(ymin)) / (log(ymax) - log(ymin)) * (H - T - B)
}
function whisker(x, lo, hi) {
    printf "<path d=\"M%.1f %.1fV%.1fM%.1f %.1fh8M%.1f %.1fh8\" stroke=\"#333\" fill=\"none\"/>\n", \
        x, py(lo), py(hi), x - 4, py(lo), x - 4, py(hi)
}
NF < 6 || $1 == "" { if (NF) bad = bad NR " "; next }
{
    s = $1
    if (!(s in sidx)) { sidx[s] = ns + 0; sname[ns++] = s }
    if (!(($3) in cidx)) { cidx[$3] = nc; cname[nc++] = $3 }
    n = np++
    ps[n] = sidx[s]; pc[n] = cidx[$3]; pl[n] = $3
    pxv[n] = (logx ? log($2) / log(2) : $2 + 0)
    lo[n] = $4; med[n] = $5; hi[n] = $6
    if ($6 + 0 > top) top = $6 + 0
    if ($4 + 0 > 0 && (low == "" || $4 + 0 < low)) low = $4 + 0
}
END {
    if (bad != "") { print "svg-chart: lines with fewer than 6 fields: " bad > "/dev/stderr"; exit 1 }
    if (np == 0) { print "svg-chart: no data" > "/dev/stderr"; exit 1 }
    W = 720; H = 420; L = 70; R = 20; T = 40; B = 60 + 18 * int((ns + 2) / 3)
    split("#1f77b4 #d62728 #2ca02c #ff7f0e #9467bd #8c564b #e377c2 #7f7f7f", color, " ")
    # Y: 0 to a round number above the largest max, ticks at 1, 2 or 5 x 10^k;
    # logarithmic: whole decades, ticks at 1, 2 and 5 x 10^k.
    if (top <= 0) top = 1
    e = 10 ^ int(log(top) / log(10)); if (e > top) e /= 10
    split("0.1 0.2 0.5 1 2 5 10", mult, " ")
    for (i = 1; i <= 7; i++) if (top / (e * mult[i]) <= 6) { step = e * mult[i]; break }
    ymax = step * (int(top / step) + 1)
    if (logy) {
        if (low == "") low = top / 10
        ymin = 10 ^ floor10(low); ymax = 10 ^ -floor10(1 / top); if (ymax <= ymin) ymax = ymin * 10
        nt = 0
        for (d = ymin; d < ymax * 1.001; d *= 10)
            for (i = 4; i <= 6; i++) if (d * mult[i] <= ymax * 1.001) tick[++nt] = d * mult[i]
    } else
        for (y = 0; y <= ymax + step / 2; y += step) tick[++nt] = y
    for (s = 0; s < ns; s++) {
        base = sname[s]
        dashed[s] = (dash != "" && sub(dash, "", base))
        gsub(/^ +| +$/, "", base)
        col[s] = (dashed[s] && (base in sidx)) ? col[sidx[base]] : color[nextc++ % 8 + 1]
    }
    printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H
    printf "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
    printf "<text x=\"%d\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">%s</text>\n", W / 2, esc(title)
    for (i = 1; i <= nt; i++) {
        printf "<path d=\"M%d %.1fH%d\" stroke=\"#ddd\"/>", L, py(tick[i]), W - R
        printf "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", L - 6, py(tick[i]) + 4, tick[i]
    }
    printf "<text transform=\"translate(16 %d) rotate(-90)\" text-anchor=\"middle\">%s</text>\n", (H - B + T) / 2, esc(ytitle)
    printf "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", (W + L - R) / 2, H - B + 38, esc(xtitle)
    printf "<path d=\"M%d %dV%dH%d\" stroke=\"#333\" fill=\"none\"/>\n", L, T, H - B, W - R
    if (kind == "bars") {
        gw = (W - L - R) / nc; bw = gw * 0.8 / ns
        for (c = 0; c < nc; c++)
            printf "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", L + gw * (c + 0.5), H - B + 18, esc(cname[c])
        for (n = 0; n < np; n++) {
            x = L + gw * pc[n] + gw * 0.1 + bw * ps[n]
            printf "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"><title>%s %s: median %g (min %g, max %g)</title></rect>\n", \
                x, py(med[n]), bw * 0.9, py(0) - py(med[n]), col[ps[n]], esc(sname[ps[n]]), esc(pl[n]), med[n], lo[n], hi[n]
            whisker(x + bw * 0.45, lo[n], hi[n])
        }
    } else {
        xmin = xmax = pxv[0]
        for (n = 1; n < np; n++) { if (pxv[n] < xmin) xmin = pxv[n]; if (pxv[n] > xmax) xmax = pxv[n] }
        pad = (xmax > xmin ? (xmax - xmin) * 0.05 : 1); xmin -= pad; xmax += pad
        for (n = 0; n < np; n++) if (!((pxv[n]) in ticked)) {
            ticked[pxv[n]] = 1
            printf "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", px(pxv[n]), H - B + 18, esc(pl[n])
        }
        for (s = 0; s < ns; s++) {
            d = ""
            for (n = 0; n < np; n++) if (ps[n] == s) d = d (d == "" ? "M" : "L") sprintf("%.1f %.1f", qx(n), py(med[n]))
            printf "<path d=\"%s\" stroke=\"%s\" stroke-width=\"2\"%s fill=\"none\"/>\n", d, col[s], dashed[s] ? " stroke-dasharray=\"6 4\"" : ""
        }
        for (n = 0; n < np; n++) {
            whisker(qx(n), lo[n], hi[n])
            printf "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"><title>%s %s: median %g (min %g, max %g)</title></circle>\n", \
                qx(n), py(med[n]), col[ps[n]], esc(sname[ps[n]]), esc(pl[n]), med[n], lo[n], hi[n]
        }
    }
    # Legend, three series to a row, under the X title.
    for (s = 0; s < ns; s++) {
        x = L + (s % 3) * 220; y = H - B + 58 + 18 * int(s / 3)
        if (dashed[s])
            printf "<path d=\"M%d %dh14\" stroke=\"%s\" stroke-width=\"2\" stroke-dasharray=\"4 2\"/>", x - 1, y - 4, col[s]
        else
            printf "<rect x=\"%d\" y=\"%d\" width=\"12\" height=\"12\" fill=\"%s\"/>", x, y - 10, col[s]
        printf "<text x=\"%d\" y=\"%d\">%s</text>\n", x + 16, y, esc(sname[s])
    }
    print "<text x=\"" W - R "\" y=\"" H - 6 "\" text-anchor=\"end\" fill=\"#666\" font-size=\"10\">median; whiskers: min to max</text>"
    print "</svg>"
}' > "$out.tmp"
mv "$out.tmp" "$out"
