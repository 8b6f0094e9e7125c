// A Go program whose functions return exact values from deep recursion in several goroutines, for
// tests/test_go.py. Usage: goexits GOROUTINES DEPTH
// Each goroutine g (0..GOROUTINES-1) calls depth(DEPTH, g), which recurses to depth(0, g) through frames big
// enough that the runtime grows (copies) the goroutine's stack many times, then (*counter).add(g) once; each
// prints "goroutine ID g G depth RESULT add RESULT", ID being the runtime's goroutine id. depth(n, g) returns
// n*(n+1)/2 + g*(n+1): the sum of (k + g) for k = 0..n.
package main

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
)

type counter struct {
	mu    sync.Mutex
	total int
}

//go:noinline
func (c *counter) add(v int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total += v
	return v * 3
}

//go:noinline
func depth(n, g int) int {
	var frame [256]int64 // a big frame: the stack grows, and is copied, as the recursion deepens
	frame[n%256] = int64(n + g)
	if n == 0 {
		return int(frame[0])
	}
	return depth(n-1, g) + int(frame[n%256])
}

func goid() int {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	id, _ := strconv.Atoi(string(bytes.Fields(buf)[1]))
	return id
}

func main() {
	goroutines, _ := strconv.Atoi(os.Args[1])
	levels, _ := strconv.Atoi(os.Args[2])
	var c counter
	var wg sync.WaitGroup
	lines := make([]string, goroutines)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			d := depth(levels, g)
			lines[g] = fmt.Sprintf("goroutine %d g %d depth %d add %d", goid(), g, d, c.add(g))
		}(g)
	}
	wg.Wait()
	for _, line := range lines {
		fmt.Println(line)
	}
}
