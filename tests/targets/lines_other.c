/* The second file that has its own copy of lines.h's bump(). */
#include "lines.h"

int other_file(int v)
{
    return bump(v * 2);
}
