/* Variables, types and source lines for probes written in the program's own terms (issue 19).
 * Built twice: -g -O0 and -g -O2 -fomit-frame-pointer. Usage: sourcevars N
 *
 * For i = 0..N-1 it calls area() on a struct it fills from i, and prints what area() sees, one line per call:
 *   area x=X big=B name=NAME y=Y z=Z flag=F level=L tag2=T color=C ratio=R scale=S label=LABEL g12=G
 * (g12 is p->grid[1][2]; grid[r][c] is 100 * i + 10 * r + c). Then it prints "thrice V W" for thrice(V) = W (a
 * function written on one line) and "half X Y" for half(X) = Y (a double returned in %xmm0).
 * Before calling consume(dead, keep) it prints "consume dead=D keep=K"; consume uses dead once, first thing.
 * Each line marked COUNTED below runs once per iteration; the program prints how often it ran:
 *   counted N
 * label_of(i, factor) prints "label_of i=I factor=F" and returns names[i % 4], which main prints as "label NAME".
 * twice() is inlined (at -O0 too) twice per iteration; the program prints "twice N" with the number of its calls. */
#include <stdio.h>
#include <stdlib.h>

enum color { RED, GREEN = 5, BLUE };

struct inner {
    int y;
    short z;
};

struct point {
    int x;
    long big;
    const char *name;
    struct inner inner;
    unsigned flag : 1;
    unsigned level : 3;
    unsigned char tag[4];
    double ratio;
    enum color color;
    int grid[2][3];
};

static const char *names[] = {"zero", "one", "two", "three"};
volatile long sink;
int twice_calls;

__attribute__((noinline)) long area(struct point *p, int scale, const char *label)
{
    long result = (long)p->x * scale;
    sink += p->big;
    printf("area x=%d big=%ld name=%s y=%d z=%d flag=%u level=%u tag2=%u color=%d ratio=%g scale=%d label=%s "
           "g12=%d\n", p->x, p->big, p->name, p->inner.y, p->inner.z, p->flag, p->level, p->tag[2], p->color,
           p->ratio, scale, label, p->grid[1][2]);
    return result;
}

__attribute__((noinline)) int consume(int dead, int keep)
{
    sink += dead;
    keep = keep * 3 + (int)(sink & 1);
    printf("consume %d\n", keep);
    return keep;
}

__attribute__((noinline)) int thrice(int v) { return v * 3 + (int)(sink & 1); }

__attribute__((noinline)) double half(double x)
{
    return x / 2;
}

__attribute__((noinline)) const char *label_of(int i, double factor)
{
    printf("label_of i=%d factor=%g\n", i, factor);
    return names[i % 4];
}

static inline __attribute__((always_inline)) int twice(int v)
{
    twice_calls++;
    return v * 2 + (int)(sink & 1);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 3;
    long total = 0;
    int counted = 0;
    struct point pt = {0};
    for (int i = 0; i < n; i++) {
        pt.x = 10 + i;
        pt.big = 1000000000000L * (i + 1);
        pt.name = names[i % 4];
        pt.inner.y = -i;
        pt.inner.z = (short)(200 + i);
        pt.flag = i & 1;
        pt.level = (i + 2) & 7;
        pt.tag[2] = (unsigned char)(250 + i);
        pt.ratio = 0.5 * i;
        pt.color = i % 2 ? GREEN : BLUE;
        for (int r = 0; r < 2; r++)
            for (int c = 0; c < 3; c++)
                pt.grid[r][c] = 100 * i + 10 * r + c;
        total += area(&pt, i + 1, "lbl");
        counted++; total += twice(i) + twice(i + 7); /* COUNTED */
        printf("consume dead=%d keep=%d\n", i * 11, i + 4);
        total += consume(i * 11, i + 4);
        printf("label %s\n", label_of(i, 1.5 * i + 0.25));
        printf("thrice %d %d\n", i + 2, thrice(i + 2));
        printf("half %g %g\n", i + 0.5, half(i + 0.5));
    }
    printf("counted %d\n", counted);
    printf("twice %d\n", twice_calls);
    printf("total %ld\n", total);
    return 0;
}
