// C++ for variables by name (issue 19): this->member, a base class's member, a static member, a reference.
// Usage: cxxvars N. For i = 0..N-1 it prints "value price=P tag=T count=C k=K" as Item::value sees them, and
// "total price=P" for total(const Item &).
#include <cstdio>
#include <cstdlib>

namespace shop {
struct Base {
    int tag;
};

class Item : public Base {
public:
    static int count_;
    int price;
    __attribute__((noinline)) int value(int k) const;
};

int Item::count_ = 0;

int Item::value(int k) const
{
    std::printf("value price=%d tag=%d count=%d k=%d\n", price, tag, count_, k);
    return price * k + tag;
}
}  // namespace shop

__attribute__((noinline)) int total(const shop::Item &item)
{
    std::printf("total price=%d\n", item.price);
    return item.price + 1;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? std::atoi(argv[1]) : 3;
    long sum = 0;
    for (int i = 0; i < n; i++) {
        shop::Item item;
        item.tag = 7 * i;
        item.price = 100 + i;
        shop::Item::count_ = i * 2;
        sum += item.value(i + 1) + total(item);
    }
    std::printf("sum %ld\n", sum);
    return 0;
}
