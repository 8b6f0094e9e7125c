/* bump(): a static function of this header, one copy in each file that calls it (lines.c, lines_other.c). */
extern int bump_runs;

static inline int bump(int v)
{
    bump_runs++;
    return v + 1;
}
