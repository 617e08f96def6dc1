/* An empty stand-in for GCC 12's <amxint8intrin.h> (see amxtileintrin.h here): qkv uses no int8 tiles. */
#ifndef _AMXINT8INTRIN_H_INCLUDED
#define _AMXINT8INTRIN_H_INCLUDED
#endif
