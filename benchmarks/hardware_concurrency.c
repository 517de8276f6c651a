/* chatglm.cpp sizes its thread pool from std::thread::hardware_concurrency() and has no setting of its own
 * (chatglm.cpp 0.4.2, get_num_physical_cores: n <= 4 -> n threads, else n / 2). Preloaded, this library answers
 * that call with $HARDWARE_CONCURRENCY instead, so the suite can give the peer the same thread count as the others:
 *     HARDWARE_CONCURRENCY=2 LD_PRELOAD=libhardware_concurrency.so python ...
 * The symbol is the C++ mangled name of std::thread::hardware_concurrency(), so plain C is enough to build it. */
#include <stdlib.h>
#include <unistd.h>

unsigned int _ZNSt6thread20hardware_concurrencyEv(void) {
    const char *value = getenv("HARDWARE_CONCURRENCY");
    int count = value ? atoi(value) : 0;
    return count > 0 ? (unsigned int)count : (unsigned int)sysconf(_SC_NPROCESSORS_ONLN);
}
