#include <stdio.h>
int lib_twice(int a);
int main(void)
{
    printf("%d\n", lib_twice(21));
    return 0;
}
